"""``nnUNetv2_versemi_add_task``: add datasets to a trained VerSemi model's union."""

from __future__ import annotations

import argparse
import os
import re

from nnunetv2_versemi.entrypoints.common import add_processes, default_processes, input_errors_exit
from nnunetv2_versemi.entrypoints.data import _add_case_selection_arguments

FINETUNE_TRAINER = "VerSemiTrainer_addTask"  # the recommended fine-tuning of a grown union (docs/DATA.md)


def build_add_task_parser() -> argparse.ArgumentParser:
    from nnunetv2_versemi.data.merge import DEFAULT_NAME

    p = argparse.ArgumentParser(
        prog="nnUNetv2_versemi_add_task",
        description="Add nnU-Net raw datasets (one new task each) to a trained VerSemi model: writes a new union "
        "dataset (the old union's cases, splits and task numbers unchanged, the new tasks appended), preprocesses "
        "it with the model's plans, and writes the model's weights grown to the new tasks for "
        "nnUNetv2_train ... -pretrained_weights.",
    )
    p.add_argument("-d", required=True, help="the trained model's union dataset (id or name)")
    p.add_argument("-c", required=True, help="the trained model's configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-tr", default="VerSemiTrainer", help="the trained model's trainer (default: VerSemiTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="the trained model's plans identifier (default: nnUNetPlans)")
    p.add_argument("-f", nargs="+", default=None,
                   help="folds to warm-start from (default: every fold_X of the model folder with the checkpoint)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file of each fold (default: checkpoint_final.pth)")
    p.add_argument("-a", "--add", nargs="+", required=True, help="the new datasets (ids or DatasetXXX_Name)")
    p.add_argument("-o", type=int, required=True, help="id of the new (grown) union dataset")
    p.add_argument("-n", default=DEFAULT_NAME, help=f"name of the new union dataset (default: {DEFAULT_NAME})")
    p.add_argument("--task-names", nargs="+", default=None,
                   help="one task name per new dataset, in --add order (default: dataset name without DatasetXXX_)")
    _add_case_selection_arguments(p)
    p.add_argument("--unlabeled-dir", nargs="+", default=None, metavar="TASK=DIR",
                   help="folder of unlabeled images of a new task (default: the source's imagesUnlabeled/)")
    p.add_argument("--channel", nargs="+", default=None, metavar="TASK=IDX",
                   help="use only this channel of a multi-channel new dataset (the model's channel count must fit)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing union dataset of the same name")
    add_processes(p, "-np", default=default_processes(),
                  help="worker processes for merging and preprocessing (default: nnU-Net's, at most the CPU count)")
    p.add_argument("--no-pbar", action="store_true", help="no progress bars")
    return p


def _folds_with_checkpoint(model_folder: str, checkpoint: str) -> list[str]:
    if not os.path.isdir(model_folder):
        return []
    return sorted(m.group(1) for d in os.listdir(model_folder)
                  if (m := re.fullmatch(r"fold_(\w+)", d)) and os.path.isfile(os.path.join(model_folder, d, checkpoint)))


def add_task_main(argv: list[str] | None = None) -> None:
    """Command line: ``nnUNetv2_versemi_add_task``."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunetv2_versemi.data.add_task import AddTaskError, add_tasks
    from nnunetv2_versemi.data.merge import parse_assignments, parse_labeled_cases
    from nnunetv2_versemi.nnunet_paths import dataset_name
    from nnunetv2_versemi.training.warm_start import load_trained_model

    a = build_add_task_parser().parse_args(argv)
    with input_errors_exit("nnUNetv2_versemi_add_task"):
        folds = a.f or _folds_with_checkpoint(get_output_folder(dataset_name(a.d), a.tr, a.p, a.c), a.checkpoint)
        if not folds:
            raise AddTaskError(f"No fold of {get_output_folder(dataset_name(a.d), a.tr, a.p, a.c)} holds "
                               f"{a.checkpoint}; train the model first or give -f and --checkpoint")
        model = load_trained_model(a.d, a.c, a.tr, a.p, folds, a.checkpoint)
        chans = parse_assignments(a.channel, "--channel")
        try:
            chans_int = {k: int(v) for k, v in chans.items()}
        except ValueError as e:
            raise AddTaskError(f"--channel expects TASK=INTEGER, got {a.channel}") from e
        result = add_tasks(model, a.add, a.o, a.n, task_names=a.task_names, labeled_fraction=a.labeled_fraction,
                           labeled_cases=parse_labeled_cases(a.labeled_cases), seed=a.seed,
                           test_fraction=a.test_fraction,
                           unlabeled_dirs=parse_assignments(a.unlabeled_dir, "--unlabeled-dir"),
                           channels=chans_int, overwrite=a.overwrite, num_processes=a.np, progress=not a.no_pbar)
    name = os.path.basename(result.raw_folder)
    print(f"Tasks of {name}: {', '.join(result.table.names)} (new: {', '.join(result.new_tasks)})")
    print(f"Fine-tune from the trained model with {FINETUNE_TRAINER} (L_sup alone, 250 epochs; docs/DATA.md, "
          "\"Fine-tuning budget and learning rate\"):")
    for fold, path in result.warm_start.items():
        print(f"  nnUNetv2_train {name} {a.c} {fold} -tr {FINETUNE_TRAINER} -p {a.p} -pretrained_weights {path}")


if __name__ == "__main__":
    add_task_main()
