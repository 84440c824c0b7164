"""Selecting the cases of a merge: which training cases of each source stay labeled, become unlabeled or are
held out as test cases (seeded per task), and one job per case under its union case id."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from nnunetv2_versemi.data import normalization as norm
from nnunetv2_versemi.data.merge_scan import MergeError, _Source
from nnunetv2_versemi.tasktable import Task, TaskLabel

# ---- case selection ----------------------------------------------------------------------------------


def _task_rng(seed: int, task: str, purpose: int) -> np.random.Generator:
    # seeded per task name, so adding or reordering tasks does not change another task's selection
    return np.random.default_rng([seed, zlib.crc32(task.encode()), purpose])


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def labeled_cases_of(labeled_cases: int | dict[str, int] | None, task: str) -> int | None:
    """A task's number of labeled cases: one number for every task, or per task ({"Spleen": 3, "*": 5}; a task
    that is not named and has no "*" keeps all its labels)."""
    if isinstance(labeled_cases, dict):
        return labeled_cases.get(task, labeled_cases.get("*"))
    return labeled_cases


def _select(
    src: _Source,
    labeled_fraction: float | None,
    labeled_cases: int | dict[str, int] | None,
    test_fraction: float | None,
    seed: int,
) -> tuple[list[str], list[str], list[str]]:
    """Split a source's training cases into (labeled, unlabeled, held-out test) source case ids."""
    cases = sorted(src.train)
    test = []
    if test_fraction:
        n_test = min(_round(test_fraction * len(cases)), len(cases) - 1)
        perm = _task_rng(seed, src.task, 0).permutation(len(cases))
        test = sorted(cases[i] for i in perm[:n_test])
        cases = [c for c in cases if c not in set(test)]
    n = len(cases)
    n_cases = labeled_cases_of(labeled_cases, src.task)
    if labeled_fraction is not None:
        n_lab = max(1, min(n, _round(labeled_fraction * n)))
    elif n_cases is not None:
        n_lab = max(1, min(n, n_cases))
    else:
        n_lab = n
    perm = _task_rng(seed, src.task, 1).permutation(n)
    labeled = sorted(cases[i] for i in perm[:n_lab])
    unlabeled = sorted(c for c in cases if c not in set(labeled))
    return labeled, unlabeled, test


# ---- jobs ------------------------------------------------------------------------------------------


@dataclass
class _Job:
    kind: str  # "labeled" | "unlabeled" | "test"
    task: int
    dataset: str
    source_case: str
    case_id: str
    images: list[str]
    label: str | None
    reader: type
    channel: int | None
    declared_labels: list[int]
    num_samples: int = 0  # > 0: draw CT foreground samples (labeled case of a task with a CT channel)
    normalization: dict | None = None
    lut: list[int] | None = None
    out_images: list[str] | None = None
    out_label: str | None = None


def _schemes(src: _Source) -> list[str]:
    """nnU-Net's normalization scheme of each channel the task uses."""
    return [norm.scheme_for_channel_name(src.channel_names[str(c)]) for c in src.used_channels]


def _collapse(per_channel: list[dict]) -> dict:
    """One dict when every channel is normalized the same way (always for single-channel tasks)."""
    if all(d == per_channel[0] for d in per_channel):
        return per_channel[0]
    return {"scheme": "per_channel", "channels": per_channel}


def _build_jobs(
    srcs: list[_Source], labeled_fraction, labeled_cases, test_fraction, seed
) -> tuple[list, list]:
    """Pick labeled/unlabeled/test cases, name them, and make one job per case. Returns (jobs, tasks)."""
    jobs: list[_Job] = []
    tasks: list[Task] = []
    next_merged = 1
    seen: dict[str, str] = {}
    problems = []
    for ti, s in enumerate(srcs):
        labeled, to_unlabeled, held_out = _select(s, labeled_fraction, labeled_cases, test_fraction, seed)
        schemes = _schemes(s)
        scheme_only = _collapse([{"scheme": x} for x in schemes])
        declared = [0] + [v for _, v in s.labels]
        # a dropped label (case turned unlabeled) is still checked: the source should be sound as a whole
        entries = (
            [("labeled", c, s.train[c], s.train_labels[c]) for c in labeled]
            + [("unlabeled", c, s.train[c], s.train_labels[c]) for c in to_unlabeled]
            + [("test", c, s.train[c], s.train_labels[c]) for c in held_out]
            + [("test", c, s.test[c], s.test_labels.get(c)) for c in sorted(s.test)]
            + [("unlabeled", c, s.unlabeled[c], None) for c in sorted(s.unlabeled)]
        )
        lists: dict[str, list[str]] = {"labeled": [], "unlabeled": [], "test": []}
        for kind, case, images, label in entries:
            cid = f"{s.task}_{case}"
            if cid in seen:
                problems.append(f"Dataset {s.dataset}: duplicate case id {cid}: {images[0]} and {seen[cid]}")
                continue
            seen[cid] = images[0]
            lists[kind].append(cid)
            samples = norm.num_samples_per_case(len(labeled)) if "CT" in schemes and kind == "labeled" else 0
            job = _Job(kind, ti, s.dataset, case, cid, images, label, s.reader, s.channel, declared, samples)
            job.normalization = scheme_only
            jobs.append(job)
        task_labels = [TaskLabel(n, v, next_merged + i) for i, (n, v) in enumerate(s.labels)]
        next_merged += len(task_labels)
        tasks.append(
            Task(
                name=s.task,
                source_dataset=s.dataset,
                channel_names=dict(s.channel_names),
                labels=task_labels,
                file_ending=s.file_ending,
                channel=s.channel,
                labeled=lists["labeled"],
                unlabeled=lists["unlabeled"],
                test=lists["test"],
            )
        )
    if problems:
        raise MergeError(problems)
    return jobs, tasks
