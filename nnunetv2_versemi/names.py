"""The rules for dataset ids, dataset names, task names and case ids, in one place.

Merge, extract_task and the benchmark all name nnU-Net datasets (``DatasetXXX_Name``) and tasks; each calls the
checks here and wraps a problem in its own :class:`~nnunetv2_versemi.errors.VerSemiInputError`, so a name one
command refuses is refused by all of them with the same words.
"""

from __future__ import annotations

import os
import re

#: "all" selects union mode in ``nnUNetv2_versemi_predict --task`` and "auto" task recognition: a task of either
#: name could never be predicted on its own
RESERVED_TASK_NAMES = ("all", "auto")
_TASK_NAME = re.compile(r"[A-Za-z0-9\-]+")
# nnU-Net splits DatasetXXX_Name at the first '_': the name may hold more, but no path separator or dot
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
# case ids become file names: no separators, no "..", nothing that leaves its folder
_SAFE_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*")
_DATASET_FOLDER = re.compile(r"Dataset(\d{3})_(.+)")
_ROOT_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def split_dataset_folder_name(dataset: str) -> tuple[int, str] | None:
    """``"Dataset950_X"`` -> ``(950, "X")``; None for anything not of that form."""
    m = _DATASET_FOLDER.fullmatch(dataset)
    return (int(m.group(1)), m.group(2)) if m else None


def default_task_name(dataset: str) -> str:
    """A source dataset's task name when none is given: its name without ``DatasetXXX_``."""
    split = split_dataset_folder_name(dataset)
    return split[1] if split else dataset


def task_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a task name (it prefixes case ids and is typed after ``--task``); None if it can."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        return f"Task name '{name}' must be letters, digits or '-' only (no '_': it prefixes case ids)"
    if name.lower() in RESERVED_TASK_NAMES:
        return (f"Task name(s) ['{name}'] are reserved ('--task all' means every task at prediction, "
                "'--task auto' task recognition)")
    return None


def dataset_id_problem(dataset_id: object, option: str = "-o") -> str | None:
    """Why ``dataset_id`` cannot be a new dataset's id (nnU-Net's three digits); None if it can."""
    if not isinstance(dataset_id, int) or isinstance(dataset_id, bool) or not 0 <= dataset_id <= 999:
        return f"Output dataset id must be 0..999, got {dataset_id} ({option})"
    return None


def dataset_name_problem(name: object, option: str = "-n") -> str | None:
    """Why ``name`` cannot be the Name of a new ``DatasetXXX_Name``; None if it can."""
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
        return (f"Output dataset name '{name}' may only contain letters, digits, '_' and '-', starting with a "
                f"letter or digit ({option})")
    return None


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name`` (both parts checked by the caller with the functions above)."""
    return f"Dataset{dataset_id:03d}_{name}"


def id_in_use_problem(dataset_id: int, target: str) -> str | None:
    """A dataset of another name that holds ``dataset_id`` in nnUNet_raw, nnUNet_preprocessed or
    nnUNet_results: a second ``DatasetXXX_*`` of one id makes every later ``-d XXX`` fail."""
    prefix = f"Dataset{dataset_id:03d}_"
    for var in _ROOT_VARIABLES:
        base = os.environ.get(var)
        if base and os.path.isdir(base):
            for d in sorted(os.listdir(base)):
                if d.startswith(prefix) and d != target:
                    return (f"Dataset id {dataset_id} is already used by {os.path.join(base, d)}; pick another "
                            "output id or remove that dataset")
    return None


def unsafe_case_ids(ids, where: str) -> list[str]:
    """Problems for case ids that are not plain file-name stems (path separators, '..', leading dots)."""
    return [f"{where}: case id {c!r} is not a plain file name (letters, digits, '_', '-', single dots); "
            "refusing it, since case ids become output paths" for c in ids if not _SAFE_CASE_ID.fullmatch(c)]
