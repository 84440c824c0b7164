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
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from nnunetv2_versemi.data import normalization as norm
from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.imageio import (
    check_compressed_stream,
    foreign_image_files,
    geometry_difference,
    geometry_of,
    image_dimension,
    intensity_problem,
)
from nnunetv2_versemi.inputs import read_json_object
from nnunetv2_versemi.names import (
    dataset_folder_name,
    dataset_id_problem,
    dataset_name_problem,
    default_task_name,
    id_in_use_problem,
    task_name_problem,
    unsafe_case_ids,
)
from nnunetv2_versemi.nnunet_paths import raw_folder
from nnunetv2_versemi.tasktable import TABLE_KEY, Task, TaskLabel, TaskTable
from nnunetv2_versemi.writers import dataset_lock, make_temporary_beside, move_into_place

DEFAULT_NAME = "VerSemiUnion"
UNLABELED_DIR = "imagesUnlabeled"
OUT_FILE_ENDING = ".nii.gz"
MAX_LISTED_PROBLEMS = 20


class MergeError(VerSemiInputError):
    """Bad input to the merge. Raised before anything is written."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:MAX_LISTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        msg = shown[0] if len(shown) == 1 else "\n".join(["Cannot merge:", *[f"  - {p}" for p in shown]])
        if more > 0:
            msg += f"\n  ... and {more} more problem(s)"
        super().__init__(msg)


# ---- sources ---------------------------------------------------------------------------------------


@dataclass
class _Source:
    dataset: str  # DatasetXXX_Name
    folder: str
    task: str
    dataset_json: dict
    file_ending: str
    channel_names: dict[str, str]
    labels: list[tuple[str, int]]  # foreground (name, value), sorted by value
    channel: int | None = None
    reader: type | None = None
    train: dict[str, list[str]] = field(default_factory=dict)  # source case -> image files
    train_labels: dict[str, str] = field(default_factory=dict)
    test: dict[str, list[str]] = field(default_factory=dict)
    test_labels: dict[str, str] = field(default_factory=dict)
    unlabeled: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # facts worth telling the user, not problems

    @property
    def num_source_channels(self) -> int:
        return len(self.channel_names)

    @property
    def used_channels(self) -> list[int]:
        return list(range(self.num_source_channels)) if self.channel is None else [self.channel]


def _resolve_dataset(d: str | int, raw: str) -> tuple[str, str]:
    folder = raw_folder(d)
    return os.path.basename(folder), folder


def _read_dataset_json(name: str, folder: str) -> dict:
    path = os.path.join(folder, "dataset.json")
    try:
        dj = read_json_object(path)
    except FileNotFoundError as e:
        raise MergeError(f"Dataset {name}: {path} is missing") from e
    except ValueError as e:
        raise MergeError(f"Dataset {name}: {e}") from e
    problems = []
    chans = dj.get("channel_names", dj.get("modality"))
    if not isinstance(chans, dict) or not chans:
        problems.append(f"Dataset {name}: {path} has no 'channel_names'")
    elif sorted(chans) != [str(i) for i in range(len(chans))]:
        problems.append(
            f"Dataset {name}: {path} channel_names keys must be '0'..'{len(chans) - 1}', got {sorted(chans)}"
        )
    if not isinstance(dj.get("file_ending"), str):
        problems.append(f"Dataset {name}: {path} has no 'file_ending'")
    labels = dj.get("labels")
    if not isinstance(labels, dict) or not labels:
        problems.append(f"Dataset {name}: {path} has no 'labels'")
    else:
        for k, v in labels.items():
            if isinstance(v, (list, tuple)):
                problems.append(
                    f"Dataset {name}: label '{k}' is a region {v}; region-based datasets are not supported"
                )
            elif not isinstance(v, int) or isinstance(v, bool) or v < 0:
                problems.append(
                    f"Dataset {name}: label '{k}' has value {v!r}; expected a non-negative integer"
                )
        if "ignore" in labels:
            problems.append(f"Dataset {name}: an 'ignore' label is not supported by the merge")
        if labels.get("background") != 0 and 0 not in [v for v in labels.values() if isinstance(v, int)]:
            problems.append(f"Dataset {name}: no background label with value 0")
    if problems:
        raise MergeError(problems)
    return dj


def _list_channel_files(
    folder: str, file_ending: str, num_channels: int, where: str
) -> tuple[dict, list[str]]:
    """Group ``CASE_XXXX<ending>`` files by case; report files that break the naming or miss channels."""
    cases: dict[str, dict[int, str]] = {}
    problems = _foreign_files(folder, file_ending, where)
    pat = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
    for fn in sorted(os.listdir(folder)):
        if fn.startswith(".") or not os.path.isfile(os.path.join(folder, fn)):
            continue
        m = pat.fullmatch(fn)
        if m is None:
            if fn.endswith(file_ending):
                problems.append(
                    f"{where}: file {os.path.join(folder, fn)} is not named CASE_XXXX{file_ending}"
                )
            continue
        cases.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, fn)
    out = {}
    for case, chans in cases.items():
        if sorted(chans) != list(range(num_channels)):
            problems.append(
                f"{where}: case {case} in {folder} has channel files {sorted(chans)}, "
                f"expected {list(range(num_channels))} (channel count mismatch)"
            )
            continue
        out[case] = [chans[i] for i in range(num_channels)]
    return out, problems


def _foreign_files(folder: str, file_ending: str, where: str) -> list[str]:
    foreign = foreign_image_files(sorted(os.listdir(folder)), file_ending)
    if not foreign:
        return []
    return [f"{where}: {folder} holds {len(foreign)} image file(s) not in the dataset's file_ending {file_ending}: "
            f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}. nnU-Net would skip them silently: "
            f"convert them to {file_ending} or move them out"]


def _list_labels(folder: str, file_ending: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        return {}
    return {
        fn[: -len(file_ending)]: os.path.join(folder, fn)
        for fn in sorted(os.listdir(folder))
        if fn.endswith(file_ending) and not fn.startswith(".")
    }


def _scan_source(src: _Source, unlabeled_dir: str | None) -> list[str]:
    """Fill the case lists of a source; return structural problems."""
    where, img_dir = f"Dataset {src.dataset}", os.path.join(src.folder, "imagesTr")
    if "dataset" not in src.dataset_json and not os.path.isdir(img_dir):
        return [f"{where}: {img_dir} does not exist"]
    problems = _scan_training_cases(src, where)
    problems += unsafe_case_ids(src.train, where)
    if not src.train:
        problems.append(f"{where}: no training cases found")

    problems += _scan_test_cases(src, where)
    problems += _scan_unlabeled(src, unlabeled_dir, where)
    problems += unsafe_case_ids([*src.test, *src.unlabeled], where)
    return problems


def _scan_training_cases(src: _Source, where: str) -> list[str]:
    """Training images and labels of a source (imagesTr/labelsTr, or dataset.json's file list)."""
    fe, nc, dj = src.file_ending, src.num_source_channels, src.dataset_json
    problems = []
    if "dataset" in dj:  # explicit file list in dataset.json (nnU-Net supports this instead of imagesTr)
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        for case, entry in get_filenames_of_train_images_and_targets(
            src.folder, json.loads(json.dumps(dj))
        ).items():
            src.train[case] = entry["images"]
            src.train_labels[case] = entry["label"]
            for f in [*entry["images"], entry["label"]]:
                if not os.path.isfile(f):
                    problems.append(f"{where}: case {case}: file {f} listed in dataset.json does not exist")
    else:
        img_dir = os.path.join(src.folder, "imagesTr")
        src.train, p = _list_channel_files(img_dir, fe, nc, where)
        problems += p
        labels = _list_labels(os.path.join(src.folder, "labelsTr"), fe)
        if os.path.isdir(os.path.join(src.folder, "labelsTr")):
            problems += _foreign_files(os.path.join(src.folder, "labelsTr"), fe, where)
        for case in src.train:
            if case not in labels:
                problems.append(
                    f"{where}: case {case} has no label {os.path.join(src.folder, 'labelsTr', case + fe)}"
                )
        for case, f in labels.items():
            if case not in src.train:
                problems.append(f"{where}: label {f} has no image in {img_dir}")
        src.train_labels = {c: labels[c] for c in src.train if c in labels}
    return problems


def _scan_test_cases(src: _Source, where: str) -> list[str]:
    """imagesTs (and labelsTs where present) of a source."""
    fe, nc, problems = src.file_ending, src.num_source_channels, []
    ts_dir = os.path.join(src.folder, "imagesTs")
    if os.path.isdir(ts_dir):
        src.test, p = _list_channel_files(ts_dir, fe, nc, where)
        problems += p
        lts_dir = os.path.join(src.folder, "labelsTs")
        if os.path.isdir(lts_dir):
            labels = _list_labels(lts_dir, fe)
            for case in src.test:
                if case not in labels:
                    problems.append(
                        f"{where}: test case {case} has no label {os.path.join(lts_dir, case + fe)}"
                    )
                else:
                    src.test_labels[case] = labels[case]
    return problems


def _scan_unlabeled(src: _Source, unlabeled_dir: str | None, where: str) -> list[str]:
    """The unlabeled images of a source: ``unlabeled_dir`` if given, else the source's own folder."""
    fe, nc, problems = src.file_ending, src.num_source_channels, []
    udir = unlabeled_dir if unlabeled_dir is not None else os.path.join(src.folder, UNLABELED_DIR)
    if unlabeled_dir is not None and not os.path.isdir(unlabeled_dir):
        problems.append(f"{where} (task {src.task}): unlabeled folder {unlabeled_dir} does not exist")
    elif os.path.isdir(udir):
        src.unlabeled, p = _list_channel_files(udir, fe, nc, where)
        problems += p
        if not src.unlabeled and not p:  # a normal state ("no unlabeled images yet"), not an error
            src.notes.append(f"{where} (task {src.task}): unlabeled folder {udir} is empty: no unlabeled images")
    return problems


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


# ---- workers -----------------------------------------------------------------------------------------


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


def _where(job: _Job) -> str:
    return f"Dataset {job.dataset}, case {job.source_case}"


def _read(rw, files: list[str], what: str, where: str) -> tuple[np.ndarray, dict]:
    try:
        for f in files:
            check_compressed_stream(f)
        return rw.read_images(files) if what == "image" else rw.read_seg(files[0])
    except Exception as e:  # any reader failure: name the file
        raise MergeError(f"{where}: cannot read {what} file {files[0]}: {type(e).__name__}: {e}") from e


def _validate_case(job: _Job) -> dict:
    """Read every file of a case and check it. Returns ``{"problems": [...], "samples": CT samples or None}``."""
    where = _where(job)
    problems: list[str] = []
    out = {"problems": problems, "samples": None}
    rw = job.reader()
    try:
        chans, geoms = [], []
        for f in job.images:
            arr, props = _read(rw, [f], "image", where)
            if (p := intensity_problem(arr)) is not None:
                problems.append(f"{where}: image {f} {p}")
            out["dimension"] = image_dimension(props)
            chans.append(arr)
            geoms.append((f, arr.shape, geometry_of(props)))
        for f, shape, g in geoms[1:]:
            if shape != geoms[0][1]:
                problems.append(
                    f"{where}: image {f} has shape {shape[1:]}, channel 0 ({geoms[0][0]}) {geoms[0][1][1:]}"
                )
            elif (p := geometry_difference(geoms[0][2], g)) is not None:
                problems.append(f"{where}: image {f} geometry differs from channel 0 ({geoms[0][0]}): {p}")
        if any(c.shape[0] != 1 for c in chans):
            problems.append(
                f"{where}: image files must hold one channel each, got {[c.shape[0] for c in chans]}"
            )
        if job.label is not None:
            seg, sprops = _read(rw, [job.label], "label", where)
            if seg.shape[1:] != geoms[0][1][1:]:
                problems.append(
                    f"{where}: label {job.label} has shape {seg.shape[1:]}, image {geoms[0][0]} {geoms[0][1][1:]}"
                )
            elif (p := geometry_difference(geoms[0][2], geometry_of(sprops))) is not None:
                problems.append(f"{where}: label {job.label} geometry differs from image {geoms[0][0]}: {p}")
            if not np.all(np.isfinite(seg)):
                problems.append(f"{where}: label {job.label} contains NaN or infinite values")
            else:
                found = np.unique(seg)
                non_int = found[found != np.round(found)]
                if len(non_int):
                    problems.append(
                        f"{where}: label {job.label} has non-integer values {non_int[:5].tolist()}"
                    )
                declared = set(job.declared_labels)
                undeclared = [int(v) if abs(v) < 2**62 else v for v in found.tolist()
                              if v not in declared and float(v).is_integer()][:10]
                if undeclared:
                    problems.append(
                        f"{where}: label {job.label} has values {undeclared} not declared in dataset.json "
                        f"(declared: {sorted(job.declared_labels)})"
                    )
            if not problems and job.num_samples > 0:
                images = np.vstack(chans)
                out["samples"] = norm.case_foreground_samples(images, seg, job.num_samples, _ct_channels(job))
    except MergeError as e:
        problems += e.problems
    return out


def _dimension_problems(jobs: list[_Job], results: list[dict]) -> list[str]:
    """Every image of a task must have the dimensionality of most of its training images: nnU-Net would read
    a 2d image in a 3d task as one slice of spacing 999 and train on it without a word."""
    problems = []
    for ti in sorted({j.task for j in jobs}):
        dims = [(j, r["dimension"]) for j, r in zip(jobs, results) if j.task == ti and "dimension" in r]
        train = [d for j, d in dims if j.label is not None] or [d for _, d in dims]
        if not train:
            continue
        expected = max(set(train), key=train.count)
        problems += [f"{_where(j)}: image {j.images[0]} is a {d}d image; the task's training images are {expected}d"
                     for j, d in dims if d != expected]
    return problems


def _ct_channels(job: _Job) -> list[int]:
    """Source channel indices of the task's CT channels (those that need foreground statistics)."""
    used = list(range(len(job.images))) if job.channel is None else [job.channel]
    per_channel = norm.channel_normalizations(job.normalization, len(used))
    return [c for c, d in zip(used, per_channel) if d["scheme"] == "CT"]


def _write_image(arr: np.ndarray, props: dict, path: str) -> None:
    import SimpleITK as sitk

    if "sitk_stuff" in props:
        spacing = tuple(props["sitk_stuff"]["spacing"])
        origin = tuple(props["sitk_stuff"]["origin"])
        direction = tuple(props["sitk_stuff"]["direction"])
    else:  # readers without ITK geometry (png, tif, nibabel): keep the spacing
        spacing = tuple(float(s) for s in props["spacing"][::-1])
        origin = direction = None
    if len(spacing) == 2:
        arr = arr[0]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
        img.SetDirection(direction)
    sitk.WriteImage(img, path, True)


def _write_case(job: _Job) -> None:
    rw = job.reader()
    where = _where(job)
    images, props = _read(rw, job.images, "image", where)
    images = norm.normalize_task_image(norm.select_task_channels(images, job.channel), job.normalization)
    for c, path in enumerate(job.out_images):
        _write_image(images[c], props, path)
    if job.out_label is not None:
        seg, _ = _read(rw, [job.label], "label", where)
        lut = np.asarray(job.lut, dtype=np.int64)
        merged = lut[seg[0].astype(np.int64)]
        _write_image(merged.astype(np.uint8 if lut.max() < 256 else np.uint16), props, job.out_label)


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


def _load_sources(
    resolved: list[tuple[str, str]], tasks: list[str], channels: dict[str, int]
) -> list[_Source]:
    srcs = []
    for (name, folder), task in zip(resolved, tasks):
        dj = _read_dataset_json(name, folder)
        chans = dj.get("channel_names", dj.get("modality"))
        labels = sorted(((k, int(v)) for k, v in dj["labels"].items() if v != 0), key=lambda kv: kv[1])
        if not labels:
            raise MergeError(f"Dataset {name}: dataset.json declares no foreground label")
        src = _Source(
            name, folder, task, dj, dj["file_ending"], {str(k): v for k, v in chans.items()}, labels
        )
        if task in channels:
            if not 0 <= channels[task] < src.num_source_channels:
                raise MergeError(
                    f"--channel {task}={channels[task]}: dataset {name} has {src.num_source_channels} channel(s)"
                )
            src.channel = channels[task]
        srcs.append(src)
    counts = {s.task: len(s.used_channels) for s in srcs}
    if len(set(counts.values())) > 1:
        detail = ", ".join(
            f"{s.task} ({s.dataset}): {counts[s.task]} {list(s.channel_names.values())}" for s in srcs
        )
        raise MergeError(
            f"Tasks have different numbers of channels: {detail}. Pick one channel per multi-channel task "
            "with --channel TASK=IDX"
        )
    return srcs


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


def _task_normalization(src: _Source, task_results: list[dict]) -> dict:
    """The task's normalization dict; CT statistics from the samples of its labeled cases."""
    per_channel, k = [], 0
    for scheme in _schemes(src):
        if scheme != "CT":
            per_channel.append({"scheme": scheme})
            continue
        values, counts = norm.merge_samples(
            [r["samples"][k] for r in task_results if r["samples"] is not None]
        )
        k += 1
        if len(values) == 0:
            raise MergeError(
                f"Dataset {src.dataset} (task {src.task}): no foreground voxel in its labeled cases; "
                "CT statistics need some"
            )
        per_channel.append(norm.ct_normalization(norm.intensity_properties(values, counts)))
    return _collapse(per_channel)


def _assign_outputs(jobs: list[_Job], table: TaskTable, tmp: str, num_channels: int) -> None:
    dirs = {
        "labeled": ("imagesTr", "labelsTr"),
        "unlabeled": (UNLABELED_DIR, None),
        "test": ("imagesTs", "labelsTs"),
    }
    for j in jobs:
        task = table.tasks[j.task]
        j.normalization = task.normalization
        img_dir, lab_dir = dirs[j.kind]
        j.out_images = [
            os.path.join(tmp, img_dir, f"{j.case_id}_{c:04d}{OUT_FILE_ENDING}") for c in range(num_channels)
        ]
        if lab_dir is not None and j.label is not None:
            j.out_label = os.path.join(tmp, lab_dir, j.case_id + OUT_FILE_ENDING)
            j.lut = task.source_to_merged_lut(max(j.declared_labels) + 1).tolist()
        else:
            j.label = None


def _union_dataset_json(table: TaskTable, num_channels: int, output_name: str, provenance: dict) -> dict:
    return {
        "channel_names": {str(c): "noNorm" for c in range(num_channels)},
        "labels": table.merged_label_dict(),
        "numTraining": sum(len(t.labeled) for t in table.tasks),
        "file_ending": OUT_FILE_ENDING,
        "overwrite_image_reader_writer": "SimpleITKIO",
        "name": output_name,
        "description": "VerSemi union of "
        + ", ".join(f"{t.name}={t.source_dataset}" for t in table.tasks)
        + ". Images are normalized per task (see versemi.tasks[].normalization).",
        TABLE_KEY: table.to_dict(),
        "versemi_merge": provenance,
    }


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


def _resolve_sources(sources: list[str | int], raw: str) -> list[tuple[str, str]]:
    """(name, folder) of each source dataset; each may be given once."""
    resolved = [_resolve_dataset(s, raw) for s in sources]
    names = [n for n, _ in resolved]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MergeError(f"Dataset(s) given twice: {', '.join(dup)}")
    return resolved


def _check_task_options(tasks: list[str], unlabeled_dirs: dict, channels: dict, labeled_cases) -> None:
    """Per-task options must name tasks of this merge."""
    per_task_cases = {k: v for k, v in labeled_cases.items() if k != "*"} if isinstance(labeled_cases, dict) else {}
    for what, d in (("--unlabeled-dir", unlabeled_dirs), ("--channel", channels),
                    ("--labeled-cases", per_task_cases)):
        unknown = sorted(set(d) - set(tasks))
        if unknown:
            raise MergeError(f"{what} names unknown task(s) {unknown}; tasks are {tasks}")


def _checked_sources(resolved: list[tuple[str, str]], tasks: list[str], channels: dict, unlabeled_dirs: dict,
                     progress: bool) -> list:
    """Load and scan every source dataset (all problems at once), and give each the reader nnU-Net picks."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    srcs = _load_sources(resolved, tasks, channels)
    problems = [p for s in srcs for p in _scan_source(s, unlabeled_dirs.get(s.task))]
    if problems:
        raise MergeError(problems)
    if progress:
        for note in (n for s in srcs for n in s.notes):
            print(note)
    for s in srcs:
        # the reader nnU-Net picks for this dataset.json and file ending (chosen without probing a file, so a
        # corrupt first file is reported by the checks instead of silently switching readers)
        try:
            s.reader = determine_reader_writer_from_dataset_json(s.dataset_json, None, verbose=False)
        except RuntimeError as e:
            raise MergeError(f"Dataset {s.dataset}: no nnU-Net reader for file ending {s.file_ending}: {e}") from e
    return srcs


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
