"""Scanning the sources of a merge (:mod:`nnunetv2_versemi.data.merge`): each source dataset's dataset.json
and its case files, grouped by case, with every structural problem named; and :class:`MergeError`, the
error of every phase of the merge."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.imageio import foreign_image_files
from nnunetv2_versemi.inputs import read_json_object
from nnunetv2_versemi.names import unsafe_case_ids
from nnunetv2_versemi.nnunet_paths import raw_folder

UNLABELED_DIR = "imagesUnlabeled"
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


def _resolve_sources(sources: list[str | int], raw: str) -> list[tuple[str, str]]:
    """(name, folder) of each source dataset; each may be given once."""
    resolved = [_resolve_dataset(s, raw) for s in sources]
    names = [n for n, _ in resolved]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MergeError(f"Dataset(s) given twice: {', '.join(dup)}")
    return resolved


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
