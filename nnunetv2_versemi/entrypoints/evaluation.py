"""``nnUNetv2_versemi_evaluate``."""

from __future__ import annotations

import argparse
import os

from nnunetv2_versemi.entrypoints.common import add_processes, default_processes, input_errors_exit

PROG = "nnUNetv2_versemi_evaluate"


def build_evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Per-task Dice, IoU, HD95 and ASD of VerSemi predictions. Without --task the files are "
        "union-format (merged labels) and each case is scored on its own task's classes; with --task NAME "
        "they hold that task's source labels.",
    )
    p.add_argument("-ref", required=True, help="folder of reference label files")
    p.add_argument("-pred", required=True, help="folder of predicted label files (same case names)")
    p.add_argument(
        "-d", dest="dataset", help="union dataset id or name (or a folder holding its dataset.json)"
    )
    p.add_argument(
        "--dataset-json", help="dataset.json (or plans.json / model folder) holding the task table"
    )
    p.add_argument("--task", help="evaluate files in this task's source label values")
    p.add_argument("-o", dest="output_dir", help="output folder (default: PRED/evaluation)")
    p.add_argument(
        "--png",
        nargs="?",
        type=int,
        const=3,
        default=None,
        metavar="N",
        help="render overlays of the first N cases per task (default N: 3)",
    )
    p.add_argument("--images", help="images folder (CASE_0000.<ending>) for the overlays; implies --png")
    p.add_argument("--allow-geometry-mismatch", action="store_true",
                   help="resample a prediction whose geometry (shape, spacing, origin, direction) differs from its "
                   "reference into the reference's grid (nearest neighbour) instead of refusing it; the summary "
                   "names the resampled cases")
    p.add_argument("--file-ending", help="label file ending when a folder mixes formats (e.g. .nii.gz)")
    add_processes(p, "-np", "worker processes (default: nnU-Net's)", default=default_processes(),
                  dest="num_processes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return p

def evaluate_main(argv: list[str] | None = None) -> None:
    from nnunetv2_versemi.evaluation.evaluate import evaluate_folders, summary_markdown
    from nnunetv2_versemi.tasktable import find_task_table

    args = build_evaluate_parser().parse_args(argv)
    if args.dataset is None and args.dataset_json is None:
        build_evaluate_parser().error("give the union dataset with -d ID/NAME or --dataset-json PATH")
    png = args.png if args.png is not None else (3 if args.images else 0)
    if png < 0:
        build_evaluate_parser().error("--png N must be >= 0")
    out = args.output_dir or os.path.join(args.pred, "evaluation")
    with input_errors_exit(PROG):
        table = find_task_table(args.dataset, args.dataset_json)
        results = evaluate_folders(
            args.ref,
            args.pred,
            table,
            task=args.task,
            num_processes=max(1, args.num_processes),
            file_ending=args.file_ending,
            output_dir=out,
            png=png,
            images_dir=args.images,
            verbose=not args.quiet,
            allow_geometry_mismatch=args.allow_geometry_mismatch,
        )
    if not args.quiet:
        print(summary_markdown(results))
        print(f"Wrote {out}")
