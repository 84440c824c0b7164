"""One task of a union as an nnU-Net dataset of its own.

``write_task_dataset`` writes the task's labeled cases of a union into ``$nnUNet_raw/Dataset<id>_<name>``:
the union's images (already normalized per task, so the channel stays ``noNorm``; hard links where the file
system allows), the labels remapped to the task's classes 1..K, the union's cross-validation split
restricted to the task (so fold f of the task trains on the same cases as fold f of the union), and a task
table with this one task. The result is an ordinary nnU-Net dataset (what nnU-Net trained on each task alone
sees) and a one-task union at the same time, so ``plan_and_preprocess`` plans it like any union.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace as dc_replace
from os.path import isdir, isfile, join

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.names import (
    dataset_folder_name,
    dataset_id_problem,
    dataset_name_problem,
    id_in_use_problem,
    split_dataset_folder_name,
    task_name_problem,
)
from nnunetv2_versemi.nnunet_paths import (
    dataset_id,
    dataset_name,
    free_dataset_id,
    link_or_copy,
    preprocessed_folder,
    raw_folder,
)
from nnunetv2_versemi.tasktable import TABLE_KEY, Task, TaskLabel, TaskTable, find_task_table
from nnunetv2_versemi.writers import dataset_lock, make_temporary_beside, move_into_place

#: dataset.json key of a written task dataset: what it was built from (union, task, labeled cases, labels)
SOURCE_KEY = "versemi_task_of"


# the mark of the per-task datasets the benchmark wrote before this module existed (the same record): kept when
# it matches, rebuilt on request when it does not
_EARLIER_KEY = "versemi_benchmark"


class TaskDatasetError(VerSemiInputError):
    """A task dataset cannot be written (unknown task, foreign folder in the way, bad label file)."""


def task_dataset_source(union: str, table: TaskTable, task: str) -> dict:
    """What a task dataset of ``task`` is built from; a dataset whose record differs is out of date."""
    t = table.tasks[table.index(task)]
    return {"union": union, "task": t.name, "labeled": sorted(t.labeled),
            "labels": [[lab.name, lab.merged] for lab in t.labels]}


def union_splits_for_task(union: str, table: TaskTable, task: str) -> list[dict]:
    """The union's cross-validation split (its preprocessed ``splits_final.json``, else the task-stratified
    split planning would write) restricted to one task's labeled cases; a fold without a validation case of
    the task validates on its training cases, as nnU-Net's fold 'all' does."""
    from nnunetv2_versemi.data.splits import SPLITS_FILE, make_stratified_splits

    path = join(preprocessed_folder(union), SPLITS_FILE)
    splits = load_json(path) if isfile(path) else make_stratified_splits(table)
    mine = set(table.tasks[table.index(task)].labeled)
    out = []
    for s in splits:
        tr = sorted(c for c in s["train"] if c in mine)
        val = sorted(c for c in s["val"] if c in mine)
        out.append({"train": tr, "val": val or tr})
    return out


def _remap_label(src: str, dst: str, lut: np.ndarray) -> None:
    import SimpleITK as sitk

    seg = sitk.ReadImage(src)
    arr = sitk.GetArrayFromImage(seg)
    if arr.min() < 0 or arr.max() >= len(lut):
        raise TaskDatasetError(f"Label {src} holds values outside the union's labels 0..{len(lut) - 1}")
    out = sitk.GetImageFromArray(lut[arr].astype(np.uint8))
    out.CopyInformation(seg)
    sitk.WriteImage(out, dst, True)


def _one_task_table(union: str, table: TaskTable, task: str) -> TaskTable:
    t = table.tasks[table.index(task)]
    labels = [TaskLabel(lab.name, lab.source, i) for i, lab in enumerate(t.labels, start=1)]
    return TaskTable(tasks=[dc_replace(t, source_dataset=union, labels=labels, labeled=sorted(t.labeled),
                                       unlabeled=[], test=[])])


def write_task_dataset(union: str | int, task: str, output_name: str, replace: bool = False) -> tuple[str, bool]:
    """Write (or keep) the task dataset ``output_name`` (``DatasetXXX_Name``) of ``task`` in ``union``.

    A folder of that name written from the same union, task, labeled cases and labels (also by the benchmark
    of an earlier version) is kept. One written
    from other labeled cases (the union was merged again) is rebuilt when ``replace``, together with its
    preprocessed folder, else refused; a folder not written by this function is always refused. Everything is
    checked and written in a temporary folder first, so a failure leaves no half-written dataset. Returns
    (dataset name, whether it was written now).
    """
    union = dataset_name(union)
    src = raw_folder(union)
    out_id = _check_output_name(output_name, union)
    if (problem := task_name_problem(task)) is not None:
        raise TaskDatasetError(problem)
    table = find_task_table(union)
    if task not in table.names:
        raise TaskDatasetError(f"{union} has no task '{task}' (tasks: {', '.join(table.names)})")
    raw_root = os.path.dirname(src)
    folder = join(raw_root, output_name)
    # one writer per dataset id, as for the merge
    with dataset_lock(raw_root, out_id):
        if (problem := id_in_use_problem(out_id, output_name)) is not None:
            raise TaskDatasetError(problem)
        record = task_dataset_source(union, table, task)
        if _existing_is_current(folder, record, union, replace):
            return output_name, False
        # _existing_is_current allowed the replacement
        _write_into_place(raw_root, output_name,
                          lambda tmp: _fill_task_dataset(tmp, union, table, task, output_name, record))
    return output_name, True


def _write_into_place(raw_root: str, output_name: str, fill) -> None:
    """``fill`` a temporary folder beside the target, then replace the target and its preprocessed folder by
    it; a failure leaves no half-written dataset (the caller holds the dataset's lock)."""
    folder = join(raw_root, output_name)
    tmp = make_temporary_beside(folder)
    try:
        fill(tmp)
        stale = join(os.environ["nnUNet_preprocessed"], output_name)
        if isdir(stale):
            shutil.rmtree(stale)
        move_into_place(tmp, folder, overwrite=True)
    finally:
        if isdir(tmp):
            shutil.rmtree(tmp)


def _check_output_name(output_name: str, union: str) -> int:
    """The id of ``output_name`` (``DatasetXXX_Name``), checked by the rules every command applies; never the
    union's own id."""
    split = split_dataset_folder_name(output_name)
    if split is None:
        raise TaskDatasetError(f"'{output_name}' is not an nnU-Net dataset name (DatasetXXX_Name)")
    out_id, name = split
    if (problem := dataset_name_problem(name)) is not None:
        raise TaskDatasetError(problem)
    if out_id == dataset_id(union):
        raise TaskDatasetError(f"Output id {out_id} is the union's own id ({union}): a second "
                               f"Dataset{out_id:03d}_* would make every -d {out_id} fail. Pick another id")
    return out_id


def extract_task(union: str | int, task: str, output_id: int | None = None, name: str | None = None,
                 replace: bool = False) -> tuple[str, bool]:
    """``nnUNetv2_versemi_extract_task``: :func:`write_task_dataset` under ``output_id`` (default: the first
    free id after the union) and ``name`` (default: the task's name), both checked before anything is done."""
    union = dataset_name(union)
    if output_id is not None and (problem := dataset_id_problem(output_id)) is not None:
        raise TaskDatasetError(problem)
    name = task if name is None else name
    if (problem := dataset_name_problem(name)) is not None:
        raise TaskDatasetError(problem)
    if output_id is None:
        output_id = free_dataset_id(dataset_id(union), set())
    return write_task_dataset(union, task, dataset_folder_name(output_id, name), replace)


def _existing_is_current(folder: str, record: dict, union: str, replace: bool) -> bool:
    """Whether the task dataset in ``folder`` was written from the same source record (keep it); raises where
    a folder there may not be replaced (see :func:`write_task_dataset`)."""
    if isfile(join(folder, "dataset.json")):
        existing = load_json(join(folder, "dataset.json"))
        found = existing.get(SOURCE_KEY)
        if found == record or (found is None and existing.get(_EARLIER_KEY) == record):
            # an earlier version's dataset with the same source record holds the same images and labels
            return True
        if found is None and _EARLIER_KEY not in existing:
            raise TaskDatasetError(f"{folder} exists and is not a task dataset written by nnunetv2_versemi; "
                                   "remove or rename it")
        if not replace:
            why = (f"from other labeled cases of {found.get('union')} than {union} has now" if found is not None
                   else "by an earlier version of nnunetv2_versemi (without a task table)")
            raise TaskDatasetError(f"{folder} was written {why}")
    elif isdir(folder):
        raise TaskDatasetError(f"{folder} exists without a dataset.json; remove or rename it")
    return False


def _fill_task_dataset(tmp: str, union: str, table, task: str, output_name: str, record: dict) -> None:
    """Writes the task's labeled images (linked), its labels in local classes, dataset.json and the union's
    split restricted to the task into the folder ``tmp``."""
    src = raw_folder(union)
    union_json = load_json(join(src, "dataset.json"))
    fe, channels = union_json["file_ending"], union_json["channel_names"]
    t = table.tasks[table.index(task)]
    one = _one_task_table(union, table, task)
    lut = t.merged_to_local_lut(table.num_merged_labels)
    os.makedirs(join(tmp, "imagesTr"))
    os.makedirs(join(tmp, "labelsTr"))
    for c in sorted(t.labeled):
        for k in range(len(channels)):
            link_or_copy(join(src, "imagesTr", f"{c}_{k:04d}{fe}"), join(tmp, "imagesTr", f"{c}_{k:04d}{fe}"))
        _remap_label(join(src, "labelsTr", c + fe), join(tmp, "labelsTr", c + fe), lut)
    save_json({
        "channel_names": {str(k): "noNorm" for k in range(len(channels))},
        "labels": one.merged_label_dict(),
        "numTraining": len(t.labeled),
        "file_ending": fe,
        "overwrite_image_reader_writer": union_json.get("overwrite_image_reader_writer", "SimpleITKIO"),
        "name": output_name,
        "description": f"Task {task} of {union} alone: its labeled cases, images as normalized in the union, "
                       f"labels as the task's classes 1..{len(t.labels)}",
        SOURCE_KEY: record,
        TABLE_KEY: one.to_dict(),
    }, join(tmp, "dataset.json"), sort_keys=False)
    save_json(union_splits_for_task(union, table, task), join(tmp, "splits_final.json"), sort_keys=False)


def write_pseudo_labeled_task_dataset(union: str | int, task: str, output_name: str, pseudo_labels: dict[str, str],
                                      made_by: dict) -> tuple[str, bool]:
    """Write (or keep) ``output_name``: the task dataset of ``task`` (:func:`write_task_dataset`'s content) plus
    the task's unlabeled images of the union as training cases, labeled by ``pseudo_labels`` (unlabeled case
    id -> label file in the task's classes 1..K, e.g. a per-task model's predictions); nnU-Net's pseudo-label
    recipe. The union's split restricted to the task gets every pseudo-labeled case added to each fold's
    training cases (validation stays on true labels). ``made_by`` (what made the labels: model folder,
    checkpoint times) goes into the record: a folder with the same record is kept, any other one written by
    this package is replaced together with its preprocessed folder. Returns (dataset name, whether written).
    """
    union = dataset_name(union)
    src = raw_folder(union)
    table = find_task_table(union)
    if task not in table.names:
        raise TaskDatasetError(f"{union} has no task '{task}' (tasks: {', '.join(table.names)})")
    t = table.tasks[table.index(task)]
    missing = sorted(set(t.unlabeled) - set(pseudo_labels))
    if missing:
        raise TaskDatasetError(f"No pseudo label for {len(missing)} unlabeled case(s) of {task}, e.g. {missing[0]}")
    record = {**task_dataset_source(union, table, task), "pseudo_labeled": sorted(t.unlabeled), "made_by": made_by}
    raw_root = os.path.dirname(src)
    folder = join(raw_root, output_name)

    def fill(tmp: str) -> None:
        _fill_task_dataset(tmp, union, table, task, output_name, record)
        _add_pseudo_labeled(tmp, src, t, pseudo_labels)

    with dataset_lock(raw_root, _check_output_name(output_name, union)):
        if _existing_is_current(folder, record, union, replace=True):
            return output_name, False
        _write_into_place(raw_root, output_name, fill)
    return output_name, True


def _add_pseudo_labeled(tmp: str, union_raw: str, task: Task, pseudo_labels: dict[str, str]) -> None:
    """Links the task's unlabeled images into ``tmp``/imagesTr, copies their pseudo labels (checked to hold
    only the task's classes) into labelsTr, and adds them to the dataset.json's case count, its one-task
    table's labeled cases and every fold's training cases."""
    meta = load_json(join(tmp, "dataset.json"))
    fe, n_ch = meta["file_ending"], len(meta["channel_names"])
    lut = np.arange(len(task.labels) + 1)
    for c in sorted(task.unlabeled):
        for k in range(n_ch):
            link_or_copy(join(union_raw, "imagesUnlabeled", f"{c}_{k:04d}{fe}"),
                         join(tmp, "imagesTr", f"{c}_{k:04d}{fe}"))
        _remap_label(pseudo_labels[c], join(tmp, "labelsTr", c + fe), lut)
    one = TaskTable.from_dataset_json(meta)
    pseudo = sorted(task.unlabeled)
    meta[TABLE_KEY] = TaskTable(tasks=[dc_replace(one.tasks[0], labeled=sorted([*one.tasks[0].labeled, *pseudo]))]
                                ).to_dict()
    meta["numTraining"] = len(task.labeled) + len(pseudo)
    save_json(meta, join(tmp, "dataset.json"), sort_keys=False)
    splits = load_json(join(tmp, "splits_final.json"))
    save_json([{"train": sorted([*s["train"], *pseudo]), "val": s["val"]} for s in splits],
              join(tmp, "splits_final.json"), sort_keys=False)
