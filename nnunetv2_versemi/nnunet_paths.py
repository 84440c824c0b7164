"""The one place that turns a dataset id or name into nnU-Net's dataset name and folders.

nnU-Net resolves ``-d 950`` / ``-d Dataset950_X`` by looking in nnUNet_raw, nnUNet_preprocessed and
nnUNet_results (``maybe_convert_to_dataset_name``); every command here goes through :func:`dataset_name`, so
an unknown dataset fails the same way everywhere: :class:`DatasetNotFoundError`, naming what was given and
the folders that were searched.
"""

from __future__ import annotations

import os
import re
import shutil

from nnunetv2_versemi.errors import VerSemiInputError


class DatasetNotFoundError(VerSemiInputError):
    """A dataset id or name that nnU-Net's folders do not hold (or a name not in nnU-Net's form)."""


def _roots() -> str:
    return ", ".join(f"{v}={os.environ.get(v) or '(not set)'}"
                     for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))


def dataset_name(dataset: str | int) -> str:
    """``950``, ``"950"`` or ``"Dataset950_X"`` -> ``"Dataset950_X"`` (nnU-Net's lookup)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(str(dataset))
    except (RuntimeError, ValueError) as e:
        raise DatasetNotFoundError(f"Unknown dataset '{dataset}': no dataset of that id or name in {_roots()}") from e


def dataset_id(name: str) -> int:
    """``"Dataset950_X"`` -> 950."""
    head = name[len("Dataset"):].split("_", 1)[0] if name.startswith("Dataset") else ""
    if not head.isdigit():
        raise DatasetNotFoundError(f"'{name}' is not an nnU-Net dataset name (DatasetXXX_Name)")
    return int(head)


def _root(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise DatasetNotFoundError(f"{var} is not set")
    return value


def raw_folder(dataset: str | int) -> str:
    """``$nnUNet_raw/<name>``; the folder must exist."""
    name = dataset_name(dataset)
    folder = os.path.join(_root("nnUNet_raw"), name)
    if not os.path.isdir(folder):
        raise DatasetNotFoundError(f"Unknown dataset '{dataset}': folder {folder} does not exist")
    return folder


def preprocessed_folder(dataset: str | int) -> str:
    """``$nnUNet_preprocessed/<name>`` (not checked: planning creates it)."""
    return os.path.join(_root("nnUNet_preprocessed"), dataset_name(dataset))


def results_folder(dataset: str | int) -> str:
    """``$nnUNet_results/<name>`` (not checked: training creates it)."""
    return os.path.join(_root("nnUNet_results"), dataset_name(dataset))


def used_dataset_ids() -> set[int]:
    """The dataset ids of every ``DatasetXXX_*`` folder in nnUNet_raw, nnUNet_preprocessed and nnUNet_results."""
    ids = set()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folder = os.environ.get(var)
        if folder and os.path.isdir(folder):
            for d in os.listdir(folder):
                m = re.match(r"Dataset(\d{3})_", d)
                if m:
                    ids.add(int(m.group(1)))
    return ids


def free_dataset_id(after: int, claimed: set[int]) -> int:
    """The first dataset id after ``after`` (wrapping around) used in none of nnU-Net's folders nor in
    ``claimed``; it is added to ``claimed``."""
    used = used_dataset_ids() | claimed
    for i in [*range(after + 1, 1000), *range(1, after)]:
        if i not in used:
            claimed.add(i)
            return i
    raise DatasetNotFoundError("No free nnU-Net dataset id (001-999) left")


def relocate_dataset(name: str, new_id: int) -> str:
    """Move dataset ``name`` to id ``new_id`` in nnUNet_raw, nnUNet_preprocessed and nnUNet_results: its folders
    are renamed, and the name nnU-Net records in them (``name`` in dataset.json, ``dataset_name`` in plans files,
    the trained models' copies included) follows. Returns the new name; refuses (moving nothing) when the new name
    is taken in any of the three folders."""
    import json

    new = f"Dataset{new_id:03d}_{name.split('_', 1)[1]}"
    folders = [(os.path.join(_root(v), name), os.path.join(_root(v), new))
               for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")]
    taken = [dst for _, dst in folders if os.path.exists(dst)]
    if taken:
        raise DatasetNotFoundError(f"Cannot move {name} to id {new_id}: {taken[0]} exists")
    for src, dst in folders:
        if os.path.isdir(src):
            os.rename(src, dst)
    for _, dst in folders:
        if not os.path.isdir(dst):
            continue
        files = [os.path.join(dst, f) for f in os.listdir(dst) if f.endswith(".json")]
        files += [os.path.join(dst, d, f) for d in os.listdir(dst) if os.path.isdir(os.path.join(dst, d))
                  for f in ("plans.json", "dataset.json") if os.path.isfile(os.path.join(dst, d, f))]
        for f in files:
            with open(f) as fh:
                content = json.load(fh)
            changed = {k: new for k in ("name", "dataset_name") if isinstance(content, dict) and content.get(k) == name}
            if changed:
                content.update(changed)
                tmp = f"{f}.tmp-{os.getpid()}"
                with open(tmp, "w") as fh:
                    json.dump(content, fh, indent=4)
                os.replace(tmp, f)
    return new


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` where the file system allows, else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
