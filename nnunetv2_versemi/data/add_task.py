"""``nnUNetv2_versemi_add_task``: a trained union model + new nnU-Net raw datasets -> a grown union, ready to
fine-tune from the model.

The new union dataset holds the old union's cases unchanged (the same files, hard-linked where the file system
allows; the same labeled/unlabeled/test lists and the same cross-validation folds) and the new datasets'
cases, merged exactly as ``nnUNetv2_versemi_merge`` merges (same options, same per-task normalization). The
task table is append-only: old prompt numbers, case ids and merged label values stay, the new tasks follow.

It is preprocessed with the trained model's plans (the network and the spacing must stay): the plans.json of
the model folder is copied to the new dataset the way nnU-Net's ``move_plans_between_datasets`` moves plans,
with the grown task table attached, and nnU-Net's preprocessor and the unlabeled step run on the model's
configuration. Last, each fold's weights are grown to the new table (:mod:`nnunetv2_versemi.training.warm_start`)
for stock ``nnUNetv2_train ... -pretrained_weights``.

Every input is checked (new task names, channel count, image dimensionality, checkpoints, every file of the new
datasets) before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass

from nnunetv2_versemi.data import merge as m
from nnunetv2_versemi.nnunet_paths import link_or_copy, raw_folder
from nnunetv2_versemi.tasktable import TABLE_KEY, TaskTable
from nnunetv2_versemi.training.warm_start import TrainedModel
from nnunetv2_versemi.writers import dataset_lock, remove_stale_temporaries

UNION_FOLDERS = ("imagesTr", "labelsTr", m.UNLABELED_DIR, "imagesTs", "labelsTs")


class AddTaskError(m.MergeError):
    """Bad input to add_task (a task already in the union, images the plans cannot take, ...). Raised before
    anything is written."""


@dataclass
class AddTaskResult:
    raw_folder: str
    preprocessed_folder: str
    table: TaskTable
    new_tasks: list[str]
    warm_start: dict[str, str]  # fold -> grown checkpoint for -pretrained_weights


def _old_union(model: TrainedModel) -> tuple[str, dict, TaskTable]:
    """The raw union the model was trained on: its folder, dataset.json and task table (same cases)."""
    folder = raw_folder(model.dataset)
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    table = TaskTable.from_dataset_json(dj, where=os.path.join(folder, "dataset.json"))
    lists = [(t.name, t.labeled, t.unlabeled, t.test) for t in table.tasks]
    if not table.same_structure(model.table) or lists != [(t.name, t.labeled, t.unlabeled, t.test)
                                                          for t in model.table.tasks]:
        raise AddTaskError(f"The union in {folder} differs from the one the model in {model.folder} was trained on "
                           "(re-merged since?); add tasks to the union the model was trained on")
    return folder, dj, table


def _check_fits(model: TrainedModel, old_dj: dict, old_table: TaskTable, srcs: list) -> None:
    """New tasks the trained model cannot take: a name already in the union, another channel count, images of
    another dimensionality than a 3d configuration needs, plans that normalize (not the union's noNorm)."""
    problems = []
    clash = [s.task for s in srcs if s.task in old_table.names]
    if clash:
        problems.append(f"Task name(s) {clash} are already in the union {model.dataset} ({', '.join(old_table.names)})"
                        "; name the new tasks with --task-names")
    n = len(old_dj["channel_names"])
    for s in srcs:
        if len(s.used_channels) != n:
            problems.append(
                f"Dataset {s.dataset} (task {s.task}): {len(s.used_channels)} channel(s) "
                f"{list(s.channel_names.values())}, the model takes {n}"
                + (" (pick one with --channel TASK=IDX)" if n == 1 else ""))
    schemes = model.plans["configurations"][model.configuration].get("normalization_schemes", [])
    if any(x != "NoNormalization" for x in schemes):
        problems.append(f"The plans of {model.folder} normalize the input ({schemes}); a VerSemi union declares its "
                        "channels noNorm (each task is normalized at the merge). Re-plan the union")
    spacing = model.plans["configurations"][model.configuration].get("spacing", [])
    for s in srcs:
        dims = _image_dimension(next(iter(s.train.values()))[0])
        if len(spacing) == 3 and dims == 2:
            problems.append(f"Dataset {s.dataset} (task {s.task}) holds 2d images; the model's configuration "
                            f"{model.configuration} is 3d")
    if problems:
        raise AddTaskError(problems)


def _image_dimension(path: str) -> int | None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # not a format SimpleITK reads: nnU-Net's reader decides
    size = reader.GetSize()
    return 2 if len(size) == 2 or (len(size) == 3 and size[2] == 1) else 3


def _shift(jobs: list, tasks: list, old_table: TaskTable) -> None:
    """Tasks built by the merge from 0 -> appended after the old table (prompt numbers and merged values)."""
    offset_t, offset_v = old_table.num_tasks, old_table.num_merged_labels - 1
    for j in jobs:
        j.task += offset_t
    for t in tasks:
        for lab in t.labels:
            lab.merged += offset_v


def _grown_splits(old_splits: list[dict] | None, table: TaskTable, old_tasks: int) -> list[dict]:
    """The old folds unchanged; the new tasks' labeled cases split as the merge splits them."""
    from nnunetv2_versemi.data.splits import make_stratified_splits

    full = make_stratified_splits(table, len(old_splits) if old_splits else 5)
    if not old_splits:
        return full
    new_cases = {c for t in table.tasks[old_tasks:] for c in t.labeled}
    return [{"train": sorted(o["train"] + [c for c in f["train"] if c in new_cases]),
             "val": sorted(o["val"] + [c for c in f["val"] if c in new_cases])} for o, f in zip(old_splits, full)]


def _old_splits(model: TrainedModel, old_folder: str) -> list[dict] | None:
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunetv2_versemi.data.splits import SPLITS_FILE

    for folder in (os.path.join(str(nnUNet_preprocessed), model.dataset), old_folder):
        path = os.path.join(folder, SPLITS_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


def add_tasks(
    model: TrainedModel,
    sources: list[str | int],
    output_id: int,
    output_name: str = m.DEFAULT_NAME,
    task_names: list[str] | None = None,
    labeled_fraction: float | None = None,
    labeled_cases: int | dict[str, int] | None = None,
    seed: int = 12345,
    test_fraction: float | None = None,
    unlabeled_dirs: dict[str, str] | None = None,
    channels: dict[str, int] | None = None,
    overwrite: bool = False,
    num_processes: int = 1,
    progress: bool = True,
) -> AddTaskResult:
    """Write the grown union (raw and preprocessed) and the warm-start checkpoints; see the module docstring.
    ``model`` comes from :func:`nnunetv2_versemi.training.warm_start.load_trained_model` (checked there).
    Raises :class:`AddTaskError` (a :class:`MergeError`) on bad input, before anything is written."""
    from nnunetv2.paths import nnUNet_raw

    t0 = time.time()
    if not nnUNet_raw.is_set():
        raise AddTaskError("nnUNet_raw is not set")
    raw = str(nnUNet_raw)
    if not sources:
        raise AddTaskError("No new dataset given")
    # one writer per dataset id, as for merge: the check of the output and the writing happen under the lock
    with dataset_lock(raw, output_id):
        old_folder, old_dj, old_table = _old_union(model)
        m._check_arguments(labeled_fraction, labeled_cases, test_fraction)
        resolved = m._resolve_sources(sources, raw)
        names = [n for n, _ in resolved]
        if model.dataset in names:
            raise AddTaskError(f"{model.dataset} is the union itself, not a dataset to add")
        tasks = m._task_names(names, task_names)
        target = m._check_output(raw, output_id, output_name, [*names, model.dataset], overwrite)
        unlabeled_dirs = dict(unlabeled_dirs or {})
        channels = {k: int(v) for k, v in (channels or {}).items()}
        m._check_task_options(tasks, unlabeled_dirs, channels, labeled_cases)
        srcs = m._checked_sources(resolved, tasks, channels, unlabeled_dirs, progress)
        _check_fits(model, old_dj, old_table, srcs)
        jobs, new_tasks = m._build_jobs(srcs, labeled_fraction, labeled_cases, test_fraction, seed)
        _shift(jobs, new_tasks, old_table)
        remove_stale_temporaries(raw)
        with m._worker_pool(num_processes, len(jobs)) as pool:
            results = m._run_jobs(m._validate_case, jobs, pool, "Checking new cases", progress)
            problems = [p for r in results for p in r["problems"]]
            if problems:
                raise AddTaskError(problems)
            for ti, (src, task) in enumerate(zip(srcs, new_tasks), start=old_table.num_tasks):
                task.normalization = m._task_normalization(src, [r for j, r in zip(jobs, results) if j.task == ti])
            table = TaskTable([*old_table.tasks, *new_tasks])
            provenance = {**old_dj.get("versemi_merge", {}),
                          "added": [*old_dj.get("versemi_merge", {}).get("added", []),
                                    {"to": model.dataset, "model": model.folder, "sources": names, "seed": seed,
                                     "labeled_fraction": labeled_fraction, "labeled_cases": labeled_cases,
                                     "test_fraction": test_fraction}]}
            splits = _grown_splits(_old_splits(model, old_folder), table, old_table.num_tasks)
            final = _write_grown_union(jobs, table, pool, raw, target, old_folder, old_dj, output_name, provenance,
                                       splits, progress)
    if progress:
        print(f"Wrote {final}: tasks {', '.join(table.names)} (new: {', '.join(tasks)}) ({time.time() - t0:.1f} s)")
    pp, plans, dj = _preprocess_with_model_plans(model, target, num_processes, progress)
    from nnunetv2_versemi.training.warm_start import write_warm_start

    warm = write_warm_start(model, pp, plans, dj, table)
    return AddTaskResult(final, pp, table, tasks, warm)


def _write_grown_union(jobs: list, table: TaskTable, pool, raw: str, target: str, old_folder: str, old_dj: dict,
                       output_name: str, provenance: dict, splits: list[dict], progress: bool) -> str:
    """The old union's files linked, the new cases written, into a hidden folder renamed into place at the end."""
    num_channels = len(old_dj["channel_names"])
    final = os.path.join(raw, target)
    tmp = os.path.join(raw, f".{target}.tmp-{os.getpid()}")
    m._assign_outputs(jobs, table, tmp, num_channels)
    try:
        for sub in UNION_FOLDERS:
            src = os.path.join(old_folder, sub)
            if os.path.isdir(src):
                os.makedirs(os.path.join(tmp, sub), exist_ok=True)
                for fn in os.listdir(src):
                    link_or_copy(os.path.join(src, fn), os.path.join(tmp, sub, fn))
        for d in {os.path.dirname(p) for j in jobs for p in [*j.out_images, j.out_label] if p}:
            os.makedirs(d, exist_ok=True)
        m._run_jobs(m._write_case, jobs, pool, "Writing new cases", progress)
        dj = m._union_dataset_json(table, num_channels, output_name, provenance)
        for key in ("channel_names", "file_ending", "overwrite_image_reader_writer"):
            dj[key] = old_dj.get(key, dj[key])  # the model's input stays what it was
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(dj, f, indent=2)
        with open(os.path.join(tmp, "splits_final.json"), "w") as f:
            json.dump(splits, f, indent=2)
        if os.path.exists(final):
            old = os.path.join(raw, f".{target}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return final


def _preprocess_with_model_plans(model: TrainedModel, target: str, num_processes: int,
                                 progress: bool) -> tuple[str, dict, dict]:
    """The model's plans moved to the new dataset (as nnU-Net's ``move_plans_between_datasets`` moves them: new
    dataset name, same plans identifier and data identifiers), the grown task table attached; labeled and
    unlabeled cases preprocessed for the model's configuration. Returns (folder, plans, dataset.json)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    from nnunetv2_versemi.data.preprocess import attach_task_table, preprocess_unlabeled
    from nnunetv2_versemi.data.splits import SPLITS_FILE

    pp = os.path.join(str(nnUNet_preprocessed), target)
    if os.path.isdir(pp):
        shutil.rmtree(pp)  # a previous version of this union (--overwrite): its preprocessed cases are stale
    os.makedirs(pp)
    plans = dict(model.plans)
    plans["dataset_name"] = target
    plans.pop(TABLE_KEY, None)
    save_json(plans, os.path.join(pp, model.plans_identifier + ".json"), sort_keys=False)
    for fn in ("dataset.json", SPLITS_FILE):
        shutil.copyfile(os.path.join(str(nnUNet_raw), target, fn), os.path.join(pp, fn))
    fingerprint = os.path.join(model.folder, "dataset_fingerprint.json")
    if os.path.isfile(fingerprint):  # nnU-Net's trainer copies it into its output folder
        shutil.copyfile(fingerprint, os.path.join(pp, "dataset_fingerprint.json"))
    attach_task_table(target, model.plans_identifier)
    n = max(1, num_processes)
    preprocess([convert_dataset_name_to_id(target)], model.plans_identifier, [model.configuration], [n],
               show_progress_bar=progress)
    preprocess_unlabeled(target, model.plans_identifier, [model.configuration], n, progress)
    return pp, load_json(os.path.join(pp, model.plans_identifier + ".json")), load_json(os.path.join(pp, "dataset.json"))
