"""Cross-validation splits for a union dataset, stratified by task.

nnU-Net's default split is a seeded KFold over all training cases; with small tasks in a union, a fold can
end up validating on no case of some task. Here every task is split on its own: a task with at least
``n_splits`` labeled cases is partitioned into ``n_splits`` validation sets; a task with 2..n_splits-1
labeled cases validates on one of them in every fold (cycling, so some cases are validated in more than
one fold) and trains on the rest; a task with a single labeled case always trains on it. Unlabeled and
test cases are never part of a split.
"""

from __future__ import annotations

import numpy as np

from nnunetv2_versemi.tasktable import TaskTable

SPLITS_FILE = "splits_final.json"


def make_stratified_splits(table: TaskTable, n_splits: int = 5, seed: int = 12345) -> list[dict]:
    """``splits_final.json`` content: ``[{"train": [...], "val": [...]}, ...]`` over labeled cases only."""
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    rs = np.random.RandomState(seed)
    val: list[list[str]] = [[] for _ in range(n_splits)]
    offset = 0  # rotates where each task's round-robin starts, so the folds stay the same size overall
    all_cases: list[str] = []
    for task in table.tasks:
        cases = sorted(set(task.labeled))
        all_cases += cases
        order = [cases[i] for i in rs.permutation(len(cases))]
        if len(order) >= n_splits:
            for i, c in enumerate(order):
                val[(i + offset) % n_splits].append(c)
            offset += len(order)
        elif len(order) >= 2:
            for k in range(n_splits):
                val[k].append(order[(k + offset) % len(order)])
            offset += 1
    splits = []
    for k in range(n_splits):
        v = set(val[k])
        splits.append({"train": sorted(c for c in all_cases if c not in v), "val": sorted(v)})
    return splits


def complete_validation(train: list[str], val: list[str], table: TaskTable) -> tuple[list[str], list[str]]:
    """One fold's validation cases with every task covered: a task that trains in this fold but has no
    validation case in it (a task with a single labeled case, or a hand-made split) validates on its training
    cases, as nnU-Net's fold ``all`` does. Returns (validation cases, names of the tasks that fell back)."""
    out, fallback = list(val), []
    for ti, task in enumerate(table.tasks):
        mine_tr = [c for c in train if table.task_of_case(c) == ti]
        if mine_tr and not any(table.task_of_case(c) == ti for c in val):
            out += mine_tr
            fallback.append(task.name)
    return out, fallback


def describe_splits(splits: list[dict], table: TaskTable) -> list[str]:
    """One line per task saying how the split validates it, e.g. 'DemoCT: 1 labeled case, validated in no
    fold (training on it; each fold validates this task on its training case)'."""
    lines = []
    for ti, task in enumerate(table.tasks):
        n = len(task.labeled)
        folds = [sum(table.task_of_case(c) == ti for c in s["val"]) for s in splits]
        case_s = "case" if n == 1 else "cases"
        if not any(folds):
            what = "validated in no fold (each fold validates this task on its training cases instead)"
        elif all(folds) and sum(folds) == n:
            what = f"each case validated in exactly one of {len(splits)} folds"
        elif all(folds):
            what = f"validated in every fold, {min(folds)}-{max(folds)} case(s) each (some cases in several folds)"
        else:
            what = (f"validated in {sum(1 for f in folds if f)} of {len(splits)} folds; the others validate it on "
                    "its training cases")
        lines.append(f"{task.name}: {n} labeled {case_s}, {what}")
    return lines


def splits_match_table(splits: list[dict], table: TaskTable) -> bool:
    """True when every fold covers exactly the table's labeled cases (no stale, unlabeled or test case)."""
    labeled = {c for t in table.tasks for c in t.labeled}
    try:
        return len(splits) > 0 and all(set(s["train"]) | set(s["val"]) == labeled for s in splits)
    except (KeyError, TypeError):
        return False


def write_splits(
    folder: str, table: TaskTable, n_splits: int = 5, seed: int = 12345, overwrite: bool = False
) -> tuple[str, bool]:
    """Write ``splits_final.json`` into ``folder`` unless a file matching the table is already there.

    A present file that lists other cases than the table's labeled ones (stale after a re-merge) is replaced;
    one that matches (maybe hand-made) is kept unless ``overwrite``. Returns (path, written).
    """
    import os

    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    path = os.path.join(folder, SPLITS_FILE)
    if not overwrite and os.path.isfile(path):
        try:
            if splits_match_table(load_json(path), table):
                return path, False
        except ValueError:
            pass  # unreadable json: replace it
    save_json(make_stratified_splits(table, n_splits, seed), path, sort_keys=False)
    return path, True
