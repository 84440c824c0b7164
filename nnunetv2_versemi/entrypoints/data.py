"""Data commands: ``nnUNetv2_versemi_demo_data``, ``nnUNetv2_versemi_merge``,
``nnUNetv2_versemi_plan_and_preprocess``, ``nnUNetv2_versemi_extract_task``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nnunetv2_versemi.entrypoints.common import add_processes, default_processes, input_errors_exit


def demo_data_main(argv: list[str] | None = None) -> None:
    """Command line: ``nnUNetv2_versemi_demo_data``."""
    from nnunetv2_versemi.data.demo_data import PRESETS, generate_demo_datasets

    parser = argparse.ArgumentParser(
        prog="nnUNetv2_versemi_demo_data",
        description="Write synthetic tasks as nnU-Net v2 raw datasets (imagesTr/labelsTr, imagesUnlabeled, "
        "imagesTs/labelsTs) into $nnUNet_raw or --output.",
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="demo", help="demo: ids 901-903; paper: 911-914; hard: 921-923"
    )
    parser.add_argument("--output", "-o", help="target folder (default: $nnUNet_raw)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same data (default 0)")
    parser.add_argument("--num-labeled", type=int, help="labeled training cases per task (preset default)")
    parser.add_argument("--num-unlabeled", type=int, help="unlabeled images per task (preset default)")
    parser.add_argument("--num-test", type=int, help="labeled held-out test cases per task (preset default)")
    parser.add_argument("--scale", type=float, default=1.0, help="voxels per axis multiplier (default 1)")
    parser.add_argument("--first-id", type=int, help="dataset id of the first task (preset default)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing dataset folders")
    args = parser.parse_args(argv)

    output = args.output or os.environ.get("nnUNet_raw")
    if not output:
        parser.error("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw or pass --output DIR")
    try:
        names = generate_demo_datasets(
            output,
            preset=args.preset,
            seed=args.seed,
            num_labeled=args.num_labeled,
            num_unlabeled=args.num_unlabeled,
            num_test=args.num_test,
            scale=args.scale,
            first_id=args.first_id,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as e:
        parser.error(str(e))
    for name in names:
        print(Path(output) / name)


def build_merge_parser() -> argparse.ArgumentParser:
    """The parser of ``nnUNetv2_versemi_merge``."""
    from nnunetv2_versemi.data.merge import DEFAULT_NAME, UNLABELED_DIR

    p = argparse.ArgumentParser(
        prog="nnUNetv2_versemi_merge",
        description="Merge nnU-Net raw datasets (one task each) into one VerSemi union dataset in $nnUNet_raw.",
    )
    p.add_argument("-d", nargs="+", required=True, help="source dataset ids or full names (DatasetXXX_Name)")
    p.add_argument("-o", type=int, required=True, help="id of the union dataset to create")
    p.add_argument("-n", default=DEFAULT_NAME, help=f"name of the union dataset (default: {DEFAULT_NAME})")
    p.add_argument(
        "--task-names",
        nargs="+",
        default=None,
        help="one task name per source, in -d order (default: dataset name without DatasetXXX_; "
        "letters, digits, '-')",
    )
    _add_case_selection_arguments(p)
    p.add_argument(
        "--unlabeled-dir",
        nargs="+",
        default=None,
        metavar="TASK=DIR",
        help="folder of unlabeled images (CASE_0000<ending>) of a task; default: the source's "
        f"{UNLABELED_DIR}/ if present",
    )
    p.add_argument(
        "--channel",
        nargs="+",
        default=None,
        metavar="TASK=IDX",
        help="use only this channel of a multi-channel task (when tasks differ in channel count)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing union dataset of the same name"
    )
    add_processes(p, "-np", default=default_processes(),
                  help="worker processes for reading/writing (default: nnU-Net's default, at most the CPU count; "
        "1 = no workers)")
    p.add_argument("--no-pbar", action="store_true", help="no progress bars")
    return p


def _add_case_selection_arguments(p: argparse.ArgumentParser) -> None:
    """Which training cases of each task keep their labels, and which become test cases."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--labeled-fraction",
        type=float,
        default=None,
        help="keep labels for this fraction of each task's training cases (at least one); "
        "the rest become unlabeled images",
    )
    g.add_argument(
        "--labeled-cases",
        nargs="+",
        default=None,
        metavar="N|TASK=N",
        help="keep labels for this many training cases per task (N: every task; TASK=N: that task, e.g. "
        "Spleen=3 LA=8; with only TASK=N entries, tasks not named keep all their labels); the rest become "
        "unlabeled",
    )
    p.add_argument(
        "--seed", type=int, default=12345, help="seed of the labeled/test selection (default: 12345)"
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="hold out this fraction of each task's training cases as test cases (in addition to "
        "the source's imagesTs)",
    )


def merge_main(argv: list[str] | None = None) -> None:
    """Command line: ``nnUNetv2_versemi_merge``."""
    from nnunetv2_versemi.data.merge import MergeError, merge_datasets, parse_assignments, parse_labeled_cases

    a = build_merge_parser().parse_args(argv)
    with input_errors_exit("nnUNetv2_versemi_merge"):
        labeled_cases = parse_labeled_cases(a.labeled_cases)
        chans = parse_assignments(a.channel, "--channel")
        try:
            chans_int = {k: int(v) for k, v in chans.items()}
        except ValueError as e:
            raise MergeError(f"--channel expects TASK=INTEGER, got {a.channel}") from e
        merge_datasets(
            a.d,
            a.o,
            a.n,
            task_names=a.task_names,
            labeled_fraction=a.labeled_fraction,
            labeled_cases=labeled_cases,
            seed=a.seed,
            test_fraction=a.test_fraction,
            unlabeled_dirs=parse_assignments(a.unlabeled_dir, "--unlabeled-dir"),
            channels=chans_int,
            overwrite=a.overwrite,
            num_processes=a.np,
            progress=not a.no_pbar,
        )


def build_plan_and_preprocess_parser() -> argparse.ArgumentParser:
    """The parser of ``nnUNetv2_versemi_plan_and_preprocess``."""
    from nnunetv2_versemi.data.preprocess import DEFAULT_CONFIGURATIONS

    p = argparse.ArgumentParser(
        prog="nnUNetv2_versemi_plan_and_preprocess",
        description="nnU-Net fingerprint, planning and preprocessing of a VerSemi union dataset, plus task table "
        "in the plans, task-stratified splits and preprocessed unlabeled images.",
    )
    p.add_argument("-d", nargs="+", required=True, help="union dataset id(s) or name(s)")
    p.add_argument(
        "-c",
        nargs="+",
        default=list(DEFAULT_CONFIGURATIONS),
        help="configurations to preprocess (default: 2d 3d_fullres 3d_lowres; missing ones are skipped)",
    )
    p.add_argument(
        "-np",
        type=int,
        nargs="+",
        default=None,
        help="processes per configuration (one number for all, or one per -c; default 8/4/8 as nnU-Net)",
    )
    p.add_argument("-npfp", type=int, default=8, help="processes for fingerprint extraction (default: 8)")
    p.add_argument(
        "-pl",
        default="ExperimentPlanner",
        help="experiment planner class, e.g. nnUNetPlannerResEncM (default: ExperimentPlanner)",
    )
    p.add_argument("-gpu_memory_target", type=float, default=None, help="passed to the nnU-Net planner")
    p.add_argument("-overwrite_plans_name", default=None, help="passed to the nnU-Net planner")
    p.add_argument(
        "-p",
        default="nnUNetPlans",
        help="plans identifier for --only-attach/--only-unlabeled (default: nnUNetPlans)",
    )
    p.add_argument(
        "--verify_dataset_integrity", action="store_true", help="run nnU-Net's integrity check first"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--only-unlabeled",
        action="store_true",
        help="only preprocess the unlabeled images (plans from -p must exist); also attaches the table",
    )
    g.add_argument(
        "--only-attach",
        action="store_true",
        help="only store the task table in existing plans (-p) and write the splits",
    )
    p.add_argument("--no_pbar", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true")
    return p


def plan_and_preprocess_main(argv: list[str] | None = None) -> None:
    """Command line: ``nnUNetv2_versemi_plan_and_preprocess``."""
    from nnunetv2_versemi.data.preprocess import plan_and_preprocess
    from nnunetv2_versemi.nnunet_paths import dataset_id, dataset_name, preprocessed_folder
    from nnunetv2_versemi.writers import dataset_lock

    p = build_plan_and_preprocess_parser()
    a = p.parse_args(argv)
    if a.np is not None and len(a.np) not in (1, len(a.c)):
        p.error(f"-np takes one number or one per configuration ({len(a.c)})")
    with input_errors_exit("nnUNetv2_versemi_plan_and_preprocess"):
        for d in a.d:
            # one writer per preprocessed dataset: a second planning of the same id is refused
            name = dataset_name(d)
            with dataset_lock(os.path.dirname(preprocessed_folder(name)), dataset_id(name)):
                if a.only_attach or a.only_unlabeled:
                    _attach_and_preprocess_unlabeled(d, a)
                else:
                    plan_and_preprocess(d, a.c, a.np, a.npfp, a.pl, a.gpu_memory_target, a.overwrite_plans_name,
                                        a.verify_dataset_integrity, not a.no_pbar, a.verbose)


def _attach_and_preprocess_unlabeled(d: str, a: argparse.Namespace) -> None:
    """--only-attach / --only-unlabeled: the task table into existing plans, the splits, and (with
    --only-unlabeled) the unlabeled images."""
    from nnunetv2_versemi.data.preprocess import DEFAULT_NP, attach_task_table, preprocess_unlabeled
    from nnunetv2_versemi.data.splits import write_splits
    from nnunetv2_versemi.nnunet_paths import preprocessed_folder

    table = attach_task_table(d, a.p)
    path, written = write_splits(preprocessed_folder(d), table)
    print(f"Task table stored in {a.p}.json; {'wrote' if written else 'kept'} {path}")
    if a.only_unlabeled:
        preprocess_unlabeled(d, a.p, a.c, a.np or [DEFAULT_NP.get(c, 4) for c in a.c], not a.no_pbar)


def extract_task_main(argv: list[str] | None = None) -> None:
    """Command line: ``nnUNetv2_versemi_extract_task``."""
    from nnunetv2_versemi.data.task_dataset import extract_task

    p = argparse.ArgumentParser(
        prog="nnUNetv2_versemi_extract_task",
        description="Write one task of a union as an nnU-Net dataset of its own: the task's labeled cases (images "
        "as normalized in the union, labels as the task's classes 1..K, the union's split restricted to the "
        "task), e.g. to train nnU-Net on that task alone with the same labels.",
    )
    p.add_argument("-d", required=True, help="union dataset id or name")
    p.add_argument("-t", "--task", required=True, help="task name (as in the union's task table)")
    p.add_argument("-o", "--output-id", type=int, default=None,
                   help="dataset id of the new dataset (default: the first free id after the union)")
    p.add_argument("-n", "--name", default=None, help="name of the new dataset (default: the task name)")
    p.add_argument("--replace", action="store_true",
                   help="rewrite a dataset of that name written from other labeled cases of the union")
    a = p.parse_args(argv)
    with input_errors_exit("nnUNetv2_versemi_extract_task"):
        name, written = extract_task(a.d, a.task, a.output_id, a.name, a.replace)
    print(f"{'Wrote' if written else 'Kept (up to date)'} {name}; plan it with nnUNetv2_plan_and_preprocess "
          f"-d {name[7:10]} or nnUNetv2_versemi_plan_and_preprocess -d {name[7:10]}")
