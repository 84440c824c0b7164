"""``nnUNetv2_versemi_merge``: several nnU-Net raw datasets -> one union raw dataset with a task table.

Each source dataset becomes one task. The union is a standard nnU-Net raw dataset:

- case ids ``<task>_<source case>``; labels remapped to one label space (0 = background, then each task's
  foreground classes in task order, named ``<task>_<label>``);
- images normalized per task (see :mod:`nnunetv2_versemi.data.normalization`), written as float32
  ``.nii.gz`` with the channel(s) declared ``noNorm``, geometry kept;
- ``imagesTr``/``labelsTr`` (labeled cases only), ``imagesUnlabeled``, ``imagesTs``/``labelsTs``;
- ``dataset.json`` with the ``versemi`` task table and ``splits_final.json`` (task-stratified), which stock
  nnU-Net planning copies into the preprocessed folder.

Everything is validated (all files read) before anything is written; the union is written into a hidden
temporary folder next to the target and renamed at the end, so a failed merge leaves nothing behind.
Sources are only read.

The phases have modules of their own: :mod:`~nnunetv2_versemi.data.merge_scan` (the sources),
:mod:`~nnunetv2_versemi.data.merge_select` (which cases go where), :mod:`~nnunetv2_versemi.data.merge_validate`
(pass 1) and :mod:`~nnunetv2_versemi.data.merge_write` (pass 2). This module checks the arguments and runs the
passes; it calls the case writer through its own name ``_write_case``, as :mod:`~nnunetv2_versemi.data.add_task`
does, so one replacement of ``merge._write_case`` reaches both.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import shutil
import time

# ``name as name``: re-exported, preprocessing and the entry points import it from here
from nnunetv2_versemi.data.merge_scan import UNLABELED_DIR as UNLABELED_DIR
from nnunetv2_versemi.data.merge_scan import MergeError, _checked_sources, _resolve_sources
from nnunetv2_versemi.data.merge_select import _build_jobs
from nnunetv2_versemi.data.merge_validate import _dimension_problems, _task_normalization, _validate_case
from nnunetv2_versemi.data.merge_write import _assign_outputs, _union_dataset_json, _write_case
from nnunetv2_versemi.names import (
    dataset_folder_name,
    dataset_id_problem,
    dataset_name_problem,
    default_task_name,
    id_in_use_problem,
    task_name_problem,
)
from nnunetv2_versemi.tasktable import TABLE_KEY, TaskTable
from nnunetv2_versemi.writers import dataset_lock, make_temporary_beside, move_into_place

DEFAULT_NAME = "VerSemiUnion"


# ---- workers -----------------------------------------------------------------------------------------


def _worker_pool(num_processes: int, num_jobs: int):
    """A pool of spawned workers for both passes (starting one costs seconds), or none for 1 process."""
    if num_processes <= 1 or num_jobs <= 1:
        return contextlib.nullcontext(None)
    # 'spawn' like nnU-Net: forking a process that has imported torch/blosc2 threads is fragile
    return multiprocessing.get_context("spawn").Pool(min(num_processes, num_jobs))


def _run_jobs(fn, jobs: list, pool, desc: str, progress: bool) -> list:
    from tqdm import tqdm

    if pool is None:
        return [fn(j) for j in tqdm(jobs, desc=desc, disable=not progress)]
    return list(tqdm(pool.imap(fn, jobs), total=len(jobs), desc=desc, disable=not progress))


# ---- merge -------------------------------------------------------------------------------------------


def parse_assignments(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise MergeError(f"{what} expects TASK=VALUE, got '{it}'")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def _check_output(raw: str, output_id: int, output_name: str, sources: list[str], overwrite: bool) -> str:
    problem = dataset_id_problem(output_id) or dataset_name_problem(output_name)
    if problem:
        raise MergeError(problem)
    target = dataset_folder_name(output_id, output_name)
    if any(s.startswith(f"Dataset{output_id:03d}_") for s in sources):
        raise MergeError(f"Output id {output_id} is one of the source datasets ({', '.join(sources)})")
    if (problem := id_in_use_problem(output_id, target)) is not None:
        raise MergeError(problem)
    existing = os.path.join(raw, target)
    if os.path.exists(existing) and not overwrite:
        raise MergeError(f"Output dataset {existing} already exists (use --overwrite to replace it)")
    if os.path.exists(existing):
        try:
            with open(os.path.join(existing, "dataset.json")) as f:
                is_union = TABLE_KEY in json.load(f)
        except (OSError, ValueError):
            is_union = False
        if not is_union:
            raise MergeError(f"--overwrite only replaces a union dataset; {existing} is not one (its dataset.json "
                             "has no task table). Remove it yourself if it should go")
    return target


def parse_labeled_cases(items: list[str] | None) -> int | dict[str, int] | None:
    """``["3"]`` -> 3; ``["Spleen=3", "LA=8"]`` -> {"Spleen": 3, "LA": 8}; ``["5", "LA=8"]`` -> {"*": 5, "LA": 8}."""
    if not items:
        return None
    out: dict[str, int] = {}
    for item in items:
        key, _, value = item.rpartition("=") if "=" in item else ("*", "", item)
        try:
            n = int(value)
        except ValueError:
            raise MergeError(f"--labeled-cases expects N or TASK=N, got '{item}'") from None
        if key in out:
            raise MergeError(f"--labeled-cases gives {'every task' if key == '*' else key} twice")
        out[key] = n
    return out["*"] if set(out) == {"*"} else out


def _check_arguments(labeled_fraction, labeled_cases, test_fraction) -> None:
    if labeled_fraction is not None and labeled_cases is not None:
        raise MergeError("Give --labeled-fraction or --labeled-cases, not both")
    if labeled_fraction is not None and not 0 < labeled_fraction <= 1:
        raise MergeError(f"--labeled-fraction must be in (0, 1], got {labeled_fraction}")
    counts = labeled_cases.values() if isinstance(labeled_cases, dict) else [labeled_cases]
    bad = [c for c in counts if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1)]
    if bad:
        raise MergeError(f"--labeled-cases must be at least 1, got {labeled_cases}")
    if test_fraction is not None and not 0 <= test_fraction < 1:
        raise MergeError(f"--test-fraction must be in [0, 1), got {test_fraction}")


def _task_names(names: list[str], task_names: list[str] | None) -> list[str]:
    if task_names is not None and len(task_names) != len(names):
        raise MergeError(f"--task-names got {len(task_names)} names for {len(names)} datasets")
    tasks = list(task_names) if task_names is not None else [default_task_name(n) for n in names]
    problems = []
    for n, t in zip(names, tasks):
        problem = task_name_problem(t)
        if problem is None:
            continue
        hint = " Choose other names with --task-names"
        if task_names is None:
            suggestion = [re.sub(r"[^A-Za-z0-9\-]", "", default_task_name(x)) or f"T{i}" for i, x in enumerate(names)]
            hint = " Name the tasks with --task-names, e.g. --task-names " + " ".join(suggestion)
        problems.append(f"{problem} (dataset {n}).{hint}")
    if len(set(tasks)) != len(tasks):
        problems.append(f"Task names must be unique, got {tasks}")
    if problems:
        raise MergeError(problems)
    return tasks


def merge_datasets(
    sources: list[str | int],
    output_id: int,
    output_name: str = DEFAULT_NAME,
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
) -> str:
    """Merge nnU-Net raw datasets into one union dataset in ``$nnUNet_raw``; returns its folder.

    See the module docstring and docs/DATA.md for the layout. Raises :class:`MergeError` on bad input, before
    anything is written. ``num_processes`` > 1 reads and writes cases in that many spawned workers.
    """
    from nnunetv2.paths import nnUNet_raw

    t0 = time.time()
    if not nnUNet_raw.is_set():
        raise MergeError("nnUNet_raw is not set")
    raw = str(nnUNet_raw)
    if not sources:
        raise MergeError("No source datasets given")
    _check_arguments(labeled_fraction, labeled_cases, test_fraction)
    if (problem := dataset_id_problem(output_id)) is not None:
        raise MergeError(problem)
    # one writer per dataset id: a second merge into this id, started before this one ends, is refused
    with dataset_lock(raw, output_id):
        table = _merge_locked(raw, sources, output_id, output_name, task_names, labeled_fraction, labeled_cases,
                              seed, test_fraction, unlabeled_dirs, channels, overwrite, num_processes, progress)
    final = os.path.join(raw, dataset_folder_name(output_id, output_name))
    if progress:
        _print_merge_summary(final, table, time.time() - t0)
    return final


def _merge_locked(raw: str, sources, output_id, output_name, task_names, labeled_fraction, labeled_cases, seed,
                  test_fraction, unlabeled_dirs, channels, overwrite, num_processes, progress) -> TaskTable:
    """:func:`merge_datasets` once it holds the output id's lock: check everything, then write."""
    resolved = _resolve_sources(sources, raw)
    names = [n for n, _ in resolved]
    tasks = _task_names(names, task_names)
    target = _check_output(raw, output_id, output_name, names, overwrite)
    unlabeled_dirs = dict(unlabeled_dirs or {})
    channels = {k: int(v) for k, v in (channels or {}).items()}
    _check_task_options(tasks, unlabeled_dirs, channels, labeled_cases)

    srcs = _checked_sources(resolved, tasks, channels, unlabeled_dirs, progress)
    num_channels = len(srcs[0].used_channels)
    jobs, table_tasks = _build_jobs(srcs, labeled_fraction, labeled_cases, test_fraction, seed)
    provenance = {"sources": names, "seed": seed, "labeled_fraction": labeled_fraction,
                  "labeled_cases": labeled_cases, "test_fraction": test_fraction}
    with _worker_pool(num_processes, len(jobs)) as pool:
        # pass 1: read and check every file; collect the CT foreground samples of labeled cases
        results = _run_jobs(_validate_case, jobs, pool, "Checking cases", progress)
        problems = [p for r in results for p in r["problems"]] or _dimension_problems(jobs, results)
        if problems:
            raise MergeError(problems)
        for ti, (src, task) in enumerate(zip(srcs, table_tasks)):
            task.normalization = _task_normalization(src, [r for j, r in zip(jobs, results) if j.task == ti])
        table = TaskTable(table_tasks)
        # pass 2: write into a hidden temporary folder next to the target, then rename it into place
        _write_union(jobs, table, pool, raw, target, num_channels, output_name, provenance, progress, overwrite)
    return table


def _print_merge_summary(final: str, table: TaskTable, seconds: float) -> None:
    """One line on what the merge wrote."""
    n = {k: sum(len(getattr(t, k)) for t in table.tasks) for k in ("labeled", "unlabeled", "test")}
    print(
        f"Wrote {final}: {len(table.tasks)} tasks, {n['labeled']} labeled, {n['unlabeled']} unlabeled and "
        f"{n['test']} test cases, {table.num_merged_labels - 1} foreground labels ({seconds:.1f} s)"
    )


def _check_task_options(tasks: list[str], unlabeled_dirs: dict, channels: dict, labeled_cases) -> None:
    """Per-task options must name tasks of this merge."""
    per_task_cases = {k: v for k, v in labeled_cases.items() if k != "*"} if isinstance(labeled_cases, dict) else {}
    for what, d in (("--unlabeled-dir", unlabeled_dirs), ("--channel", channels),
                    ("--labeled-cases", per_task_cases)):
        unknown = sorted(set(d) - set(tasks))
        if unknown:
            raise MergeError(f"{what} names unknown task(s) {unknown}; tasks are {tasks}")


def _write_union(jobs: list, table: TaskTable, pool, raw: str, target: str, num_channels: int, output_name: str,
                 provenance: dict, progress: bool, overwrite: bool) -> None:
    """Write every case, dataset.json and splits into a hidden folder beside the target, then rename it into
    place (replacing an existing union only at that last step)."""
    from nnunetv2_versemi.data.splits import write_splits

    final = os.path.join(raw, target)
    tmp = make_temporary_beside(final)
    _assign_outputs(jobs, table, tmp, num_channels)
    try:
        for d in {os.path.dirname(p) for j in jobs for p in [*j.out_images, j.out_label] if p}:
            os.makedirs(d, exist_ok=True)
        _run_jobs(_write_case, jobs, pool, "Writing union", progress)
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(_union_dataset_json(table, num_channels, output_name, provenance), f, indent=2)
        # stock nnU-Net planning copies a raw splits_final.json into the preprocessed folder
        write_splits(tmp, table)
        try:
            move_into_place(tmp, final, overwrite)
        except FileExistsError:
            raise MergeError(f"Output dataset {final} appeared while this merge ran (use --overwrite to replace "
                             "it)") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
