"""``nnUNetv2_versemi_predict``."""

from __future__ import annotations

import argparse

from nnunetv2_versemi.entrypoints.common import add_device, add_processes, input_errors_exit


def predict_main(argv: list[str] | None = None) -> None:
    from nnunetv2_versemi.inference import predict

    parser = argparse.ArgumentParser(prog="nnUNetv2_versemi_predict", description=predict.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", required=True, help="input folder (CASE_0000.ext files)")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("-d", required=True, help="union dataset id or name")
    parser.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("-f", nargs="+", default=["0"], help="folds to ensemble (default 0)")
    parser.add_argument("--task", default=predict.AUTO,
                        help="task name (its source-format images), 'auto' (default: source-format images of any "
                             "task, each case's task recognised, written to recognised_tasks.json) or 'all' "
                             "(union-format images, merged labels)")
    parser.add_argument("-tr", default="VerSemiTrainer", help="trainer class (default VerSemiTrainer)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding window step size (default 0.5)")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    add_processes(parser, "-npp", "preprocessing processes (default 3)", default=3)
    add_processes(parser, "-nps", "segmentation export processes (default 3)", default=3)
    add_device(parser)
    args = parser.parse_args(argv)
    with input_errors_exit("nnUNetv2_versemi_predict"):
        written = predict.run(args.i, args.o, args.d, args.c, args.f, args.task, args.tr, args.p, args.chk,
                      args.step_size, not args.disable_tta, args.npp, args.nps, args.device)
    print(f"Wrote {len(written)} prediction(s) to {args.o}")
