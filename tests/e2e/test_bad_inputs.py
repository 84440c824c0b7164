"""Every broken input known so far, one row each, through the library functions the commands call.

For each row: the exact error class, a message that names the file or case and what is wrong, and nothing
written or modified anywhere in the sandbox (the whole tree, sources and output folders, is checksummed
before and after). docs/RELIABILITY.md quotes the count of this table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_versemi.data import merge as M
from nnunetv2_versemi.data import normalization as N
from nnunetv2_versemi.evaluation.evaluate import EvaluationError, evaluate_folders
from nnunetv2_versemi.inference import predict as P
from nnunetv2_versemi.nnunet_paths import DatasetNotFoundError
from nnunetv2_versemi.plans_presets import PlansPresetError, apply_to_plans_file
from nnunetv2_versemi.tasktable import TABLE_KEY, Task, TaskLabel, TaskTable
from nnunetv2_versemi.writers import WriterLockError

import _synth as S  # tests/ is on sys.path (pyproject.toml: pytest's pythonpath)


def _snapshot(root: str) -> tuple[dict[str, str], set[str]]:
    """Checksums of every file and the set of every folder below root."""
    files, dirs = {}, set()
    for d, subdirs, fns in os.walk(root):
        dirs.update(os.path.relpath(os.path.join(d, s), root) for s in subdirs)
        for fn in fns:
            p = os.path.join(d, fn)
            with open(p, "rb") as f:
                files[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return files, dirs


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / v).mkdir()
        monkeypatch.setenv(v, str(tmp_path / v))
    monkeypatch.setattr(N, "NNUNET_FOREGROUND_SAMPLES", 2e5)
    return str(tmp_path)


# ---- merge: broken source datasets (nnUNetv2_versemi_merge) ---------------------------------------------
def _corrupt_undeclared_label(raw):
    p = os.path.join(raw, "Dataset502_Atrium", "labelsTr", "atrtr001.nii.gz")
    seg = S.read(p)
    seg[0, 0, 0] = 3
    S.write(seg, p)
    return [r"Dataset502_Atrium, case atrtr001", r"atrtr001\.nii\.gz has values \[3\] not declared"]


def _corrupt_shape(raw):
    p = os.path.join(raw, "Dataset503_Kidney", "labelsTr", "kidtr002.nii.gz")
    S.write(S.read(p)[:, :15], p)
    return [r"case kidtr002", r"kidtr002\.nii\.gz has shape \(16, 15, 16\)"]


def _label_header(name: str, dataset: str, case: str, **header) -> Callable:
    """A row: one label file rewritten with another header field (origin, direction or spacing)."""
    def corrupt(raw):
        p = os.path.join(raw, dataset, "labelsTr", f"{case}.nii.gz")
        S.write(S.read(p), p, **header)
        return [rf"case {case}", rf"{case}\.nii\.gz geometry differs.*{next(iter(header))}"]
    corrupt.__name__ = f"_corrupt_{name}"
    return corrupt


_corrupt_geometry = _label_header("geometry", "Dataset501_Liver", "livtr000", origin=(0.0, 0.0, 0.0))
_corrupt_label_direction = _label_header("label_direction", "Dataset502_Atrium", "atrtr000",
                                         direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
_corrupt_label_spacing = _label_header("label_spacing", "Dataset502_Atrium", "atrtr003", spacing=(0.8, 0.9, 3.0))


def _corrupt_channels(raw):
    S.make_dataset(raw, 504, "Prostate", "MR", 2, channels=2, seed=4)
    return [r"different numbers of channels", r"Prostate \(Dataset504_Prostate\): 2"]


def _corrupt_missing_channel_file(raw):
    os.remove(os.path.join(raw, "Dataset502_Atrium", "imagesTs", "atrts000_0000.nii.gz"))
    S.write(
        np.zeros((16, 16, 16), np.float32),
        os.path.join(raw, "Dataset502_Atrium", "imagesTs", "atrts000_0001.nii.gz"),
    )
    return [r"case atrts000 .* has channel files \[1\], expected \[0\]"]


def _corrupt_duplicate(raw):
    src = os.path.join(raw, "Dataset501_Liver", "imagesTr", "livtr001_0000.nii.gz")
    with (
        open(src, "rb") as f,
        open(os.path.join(raw, "Dataset501_Liver", "imagesUnlabeled", "livtr001_0000.nii.gz"), "wb") as g,
    ):
        g.write(f.read())
    return [r"duplicate case id Liver_livtr001"]


def _corrupt_path_traversal(raw):
    # a case id from dataset.json's "dataset" key that would write outside nnUNet_raw
    folder = os.path.join(raw, "Dataset503_Kidney")
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    img, lab = os.path.join(folder, "imagesTr", "kidtr001_0000.nii.gz"), os.path.join(folder, "labelsTr",
                                                                                        "kidtr001.nii.gz")
    dj["dataset"] = {"kidtr001": {"images": [img], "label": lab},
                     "x/../../../../elsewhere/victim": {"images": [img], "label": lab}}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dj, f)
    return [r"case id 'x/\.\./\.\./\.\./\.\./elsewhere/victim' is not a plain file name"]


def _corrupt_reserved_task_name(raw):
    os.rename(os.path.join(raw, "Dataset503_Kidney"), os.path.join(raw, "Dataset503_all"))
    return [r"Task name\(s\) \['all'\] are reserved"]


def _truncate(path: str, keep) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: keep(len(data))])


def _corrupt_truncated_image(raw):
    # half the bytes of a .nii.gz: ITK reads it anyway (zero-filled); the gzip stream check does not
    _truncate(os.path.join(raw, "Dataset501_Liver", "imagesTr", "livtr001_0000.nii.gz"), lambda n: n // 2)
    return [r"Dataset501_Liver, case livtr001: cannot read image file .*livtr001_0000\.nii\.gz: EOFError"]


def _corrupt_truncated_label(raw):
    _truncate(os.path.join(raw, "Dataset502_Atrium", "labelsTr", "atrtr001.nii.gz"), lambda n: 200)
    return [r"Dataset502_Atrium, case atrtr001: cannot read label file .*atrtr001\.nii\.gz"]


def _corrupt_unreadable(raw):
    with open(os.path.join(raw, "Dataset503_Kidney", "imagesTr", "kidtr001_0000.nii.gz"), "wb") as f:
        f.write(b"not an image")
    return [r"Dataset503_Kidney, case kidtr001: cannot read image file .*kidtr001_0000\.nii\.gz"]


# ITK's NIfTI reader turns NaN/inf into 0, so the non-finite voxels go into .mha files (a source format
# nnU-Net's SimpleITKIO reads as well)
def _corrupt_nan(raw):
    S.make_dataset(raw, 504, "Lung", "MR", 2, seed=4, file_ending=".mha")
    p = os.path.join(raw, "Dataset504_Lung", "imagesTr", "luntr001_0000.mha")
    img = S.read(p)
    img[3, 3, 3] = np.nan
    S.write(img, p)
    return [r"Dataset504_Lung, case luntr001: image .*luntr001_0000\.mha contains NaN"]


def _corrupt_inf(raw):
    S.make_dataset(raw, 504, "Lung", "MR", 2, n_unlabeled=1, seed=4, file_ending=".mha")
    p = os.path.join(raw, "Dataset504_Lung", "imagesUnlabeled", "lunun000_0000.mha")
    img = S.read(p)
    img[1, 2, 3] = np.inf
    S.write(img, p)
    return [r"case lunun000: image .*lunun000_0000\.mha contains infinite"]


def _corrupt_missing_label(raw):
    os.remove(os.path.join(raw, "Dataset501_Liver", "labelsTr", "livtr002.nii.gz"))
    return [r"Dataset501_Liver: case livtr002 has no label"]


def _corrupt_task_name(raw):
    os.rename(os.path.join(raw, "Dataset503_Kidney"), os.path.join(raw, "Dataset503_Kid_ney"))
    return [r"Task name 'Kid_ney'.*no '_'.*--task-names"]


def _corrupt_foreign_format(raw):
    # one .mha pair inside a .nii.gz dataset: nnU-Net would skip it without a word
    folder = os.path.join(raw, "Dataset501_Liver")
    for sub, name in (("imagesTr", "livtr009_0000"), ("labelsTr", "livtr009")):
        S.write(S.read(os.path.join(folder, sub, "livtr001" + name[8:] + ".nii.gz")),
                os.path.join(folder, sub, name + ".mha"))
    return [r"Dataset501_Liver: .*imagesTr holds 1 image file\(s\) not in the dataset's file_ending \.nii\.gz: "
            r"livtr009_0000\.mha", r"labelsTr holds 1 image file\(s\).*livtr009\.mha"]



def _corrupt_dataset_json_list(raw):
    with open(os.path.join(raw, "Dataset502_Atrium", "dataset.json"), "w") as f:
        json.dump([{"channel_names": {"0": "MR"}}], f)
    return [r"Dataset502_Atrium: .*dataset\.json holds a JSON list, expected a JSON object"]


def _corrupt_dataset_json_invalid(raw):
    with open(os.path.join(raw, "Dataset502_Atrium", "dataset.json"), "w") as f:
        f.write('{"channel_names": ')
    return [r"Dataset502_Atrium: .*dataset\.json is not valid JSON"]


def _corrupt_2d_unlabeled(raw):
    # a 2d image in imagesUnlabeled of a 3d task: nnU-Net would read it as one slice of spacing 999
    p = os.path.join(raw, "Dataset501_Liver", "imagesUnlabeled", "livun009_0000.nii.gz")
    S.write(np.zeros((16, 16), np.float32), p, spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
    return [r"Dataset Dataset501_Liver, case livun009: image .*livun009_0000\.nii\.gz is a 2d image; the task's "
            r"training images are 3d"]


def _corrupt_overflowing_values(raw):
    # +-3e38 overflows float32 z-scoring into a constant image
    p = os.path.join(raw, "Dataset502_Atrium", "imagesTr", "atrtr002_0000.nii.gz")
    img = S.read(p).astype(np.float32)
    img[0, 0, 0], img[1, 1, 1] = 3e38, -3e38
    S.write(img, p)
    return [r"case atrtr002: image .*atrtr002_0000\.nii\.gz holds 2 voxel\(s\) beyond \+-1e\+15"]


def _corrupt_zero_byte_image(raw):
    open(os.path.join(raw, "Dataset503_Kidney", "imagesTr", "kidtr000_0000.nii.gz"), "wb").close()
    return [r"Dataset503_Kidney, case kidtr000: cannot read image file .*kidtr000_0000\.nii\.gz"]


def _corrupt_text_label(raw):
    with open(os.path.join(raw, "Dataset503_Kidney", "labelsTr", "kidtr002.nii.gz"), "w") as f:
        f.write("this is a label\n")
    return [r"Dataset503_Kidney, case kidtr002: cannot read label file .*kidtr002\.nii\.gz"]


def _corrupt_byte_flip(raw):
    p = os.path.join(raw, "Dataset501_Liver", "imagesTr", "livtr003_0000.nii.gz")
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    return [r"Dataset501_Liver, case livtr003: cannot read image file .*livtr003_0000\.nii\.gz"]


def _corrupt_reserved_auto(raw):
    os.rename(os.path.join(raw, "Dataset503_Kidney"), os.path.join(raw, "Dataset503_auto"))
    return [r"Task name\(s\) \['auto'\] are reserved.*--task auto"]


def _merge_all(raw: str, **kw) -> Callable[[], object]:
    sources = sorted(d for d in os.listdir(raw) if d.startswith("Dataset"))
    return lambda: M.merge_datasets(sources, 600, num_processes=1, progress=False, **kw)


MERGE_SOURCES = [
    _corrupt_foreign_format, _corrupt_undeclared_label, _corrupt_shape, _corrupt_geometry, _corrupt_channels,
    _corrupt_missing_channel_file, _corrupt_duplicate, _corrupt_path_traversal, _corrupt_truncated_image,
    _corrupt_truncated_label, _corrupt_reserved_task_name, _corrupt_unreadable, _corrupt_nan, _corrupt_inf,
    _corrupt_missing_label, _corrupt_task_name, _corrupt_dataset_json_list, _corrupt_dataset_json_invalid,
    _corrupt_2d_unlabeled, _corrupt_overflowing_values, _corrupt_zero_byte_image, _corrupt_text_label,
    _corrupt_byte_flip, _corrupt_label_direction, _corrupt_label_spacing, _corrupt_reserved_auto,
]

# bad arguments on sound sources: (keyword arguments, pattern)
MERGE_ARGUMENTS = [
    (dict(labeled_fraction=0.0), r"--labeled-fraction must be in \(0, 1\]"),
    (dict(labeled_fraction=0.5, labeled_cases=2), r"not both"),
    (dict(labeled_cases={"Spleen": 2}), r"--labeled-cases names unknown task\(s\) \['Spleen'\]"),
    (dict(labeled_cases=0), r"--labeled-cases must be at least 1"),
    (dict(test_fraction=1.0), r"--test-fraction must be in \[0, 1\)"),
    (dict(channels={"Lung": 0}), r"--channel names unknown task\(s\) \['Lung'\]"),
    (dict(unlabeled_dirs={"Liver": "/nonexistent/unlabeled"}), r"unlabeled folder /nonexistent/unlabeled does not"),
    (dict(task_names=["A", "B"]), r"--task-names got 2 names for 3 datasets"),
    (dict(task_names=["A", "A", "B"]), r"[Dd]uplicate|twice|unique"),
]


def _merge_rows() -> list:
    rows = [pytest.param(c, id=f"merge:{c.__name__[len('_corrupt_'):]}") for c in MERGE_SOURCES]
    for kw, pattern in MERGE_ARGUMENTS:
        def setup(raw, kw=kw, pattern=pattern):
            return [pattern], kw
        rows.append(pytest.param(setup, id=f"merge-args:{'+'.join(kw)}:{pattern[:20]}"))
    return rows


@pytest.mark.parametrize("corrupt", _merge_rows())
def test_merge_refuses(sandbox, corrupt):
    raw = os.path.join(sandbox, "nnUNet_raw")
    S.make_three(raw)
    got = corrupt(raw)
    patterns, kw = got if isinstance(got, tuple) else (got, {})
    call = _merge_all(raw, **kw)
    _refused(sandbox, call, M.MergeError, patterns)


def test_merge_unknown_and_repeated_datasets(sandbox):
    raw = os.path.join(sandbox, "nnUNet_raw")
    S.make_three(raw)
    _refused(sandbox, lambda: M.merge_datasets([501, 599], 600, progress=False), DatasetNotFoundError,
             [r"Unknown dataset '599'"])
    _refused(sandbox, lambda: M.merge_datasets([501, 501], 600, progress=False), M.MergeError,
             [r"given twice: Dataset501_Liver"])


def _existing(raw, name, dataset_json=None):
    os.makedirs(os.path.join(raw, name))
    if dataset_json is not None:
        with open(os.path.join(raw, name, "dataset.json"), "w") as f:
            json.dump(dataset_json, f)


def _held_lock(raw, dataset_id=600):
    """The output id's lock, held (as by a merge running in another process) while the row runs."""
    import contextlib

    from nnunetv2_versemi.writers import dataset_lock

    stack = contextlib.ExitStack()
    stack.enter_context(dataset_lock(raw, dataset_id))
    return stack


# the output of a merge: (setup(raw) -> context or None, merge keyword arguments, error, patterns)
MERGE_OUTPUTS = {
    "negative-id": (None, dict(output_id=-5), M.MergeError, [r"Output dataset id must be 0\.\.999, got -5"]),
    "id-1000": (None, dict(output_id=1000), M.MergeError, [r"must be 0\.\.999, got 1000"]),
    "name-escapes": (None, dict(output_name="../../x"), M.MergeError,
                     [r"Output dataset name '\.\./\.\./x' may only contain letters, digits"]),
    "name-with-slash": (None, dict(output_name="a/b"), M.MergeError, [r"name 'a/b' may only contain"]),
    "id-of-a-source": (None, dict(output_id=501), M.MergeError, [r"Output id 501 is one of the source datasets"]),
    "id-used-by-another-name": (lambda raw: _existing(raw, "Dataset600_Other"), {}, M.MergeError,
                                [r"Dataset id 600 is already used by .*Dataset600_Other"]),
    "exists-without-overwrite": (lambda raw: _existing(raw, "Dataset600_VerSemiUnion", {TABLE_KEY: {}}), {},
                                 M.MergeError, [r"Dataset600_VerSemiUnion already exists \(use --overwrite"]),
    "overwrite-not-a-union": (lambda raw: _existing(raw, "Dataset600_VerSemiUnion", {"labels": {}}),
                              dict(overwrite=True), M.MergeError, [r"--overwrite only replaces a union dataset"]),
    "second-writer": (_held_lock, {}, WriterLockError,
                      [rf"Dataset id 600 in .* is being written by process {os.getpid()} \(lock .*\.Dataset600\.lock\)"]),
}


@pytest.mark.parametrize("row", sorted(MERGE_OUTPUTS), ids=lambda r: f"merge-output:{r}")
def test_merge_output_refused(sandbox, row):
    import contextlib

    raw = os.path.join(sandbox, "nnUNet_raw")
    S.make_three(raw)
    setup, kw, error, patterns = MERGE_OUTPUTS[row]
    held = (setup(raw) if setup else None) or contextlib.nullcontext()
    args = dict(output_id=600, num_processes=1, progress=False)
    args.update(kw)
    with held:
        _refused(sandbox, lambda: M.merge_datasets([501, 502, 503], **args), error, patterns)


def _refused(sandbox: str, call: Callable[[], object], error: type, patterns: list[str]) -> None:
    before = _snapshot(sandbox)
    with pytest.raises(Exception) as e:
        call()
    assert type(e.value) is error, f"expected {error.__name__}, got {type(e.value).__name__}: {e.value}"
    for p in patterns:
        assert re.search(p, str(e.value), flags=re.S), (p, str(e.value))
    after = _snapshot(sandbox)
    assert after[1] == before[1], f"folders changed: {sorted(after[1] ^ before[1])}"
    assert after[0] == before[0], f"files changed: {sorted(set(after[0]) ^ set(before[0]))}"


# ---- evaluate: files in the wrong label space, mismatched or unreadable files ------------------------------
def _eval_table() -> TaskTable:
    return TaskTable(tasks=[
        Task(name="CT", source_dataset="Dataset901_CT", channel_names={"0": "CT"},
             labels=[TaskLabel("organ", 1, 1), TaskLabel("tumour", 2, 2)], labeled=["CT_a"], test=["CT_t"]),
        Task(name="MR", source_dataset="Dataset902_MR", channel_names={"0": "MR"},
             labels=[TaskLabel("heart", 1, 3)], labeled=["MR_a"], test=["MR_t"]),
    ])


def _seg(path, arr, spacing=(1.0, 1.0, 2.0), origin=None, direction=None):
    img = sitk.GetImageFromArray(np.asarray(arr))
    img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def _blob(value=1, shape=(6, 8, 8)):
    a = np.zeros(shape, np.uint8)
    a[2:4, 2:6, 2:6] = value
    return a


def _ev_merged_with_task(ref, pred):
    _seg(ref / "MR_t.nii.gz", _blob(3))
    _seg(pred / "MR_t.nii.gz", _blob(0))
    return dict(task="MR"), [r"reference .*MR_t.nii.gz holds value\(s\) \[3\].*without --task"]


def _ev_source_without_task(ref, pred):
    _seg(ref / "MR_t.nii.gz", _blob(1))
    _seg(pred / "MR_t.nii.gz", _blob(1))
    return {}, [r"no merged label of task MR.*need --task NAME"]


def _ev_prediction_outside(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1))
    _seg(pred / "CT_t.nii.gz", _blob(9))
    return {}, [r"prediction .*CT_t.nii.gz holds value\(s\) \[9\]"]


def _ev_missing_prediction(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1))
    _seg(pred / "CT_x.nii.gz", _blob(1))
    return {}, [r"1 reference case\(s\) have no prediction.*CT_t"]


def _ev_shape(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1))
    _seg(pred / "CT_t.nii.gz", _blob(1, (6, 8, 9)))
    return {}, [r"Case CT_t: reference .* has shape \(6, 8, 8\) but prediction .* has shape \(6, 8, 9\)"]


def _ev_spacing(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1))
    _seg(pred / "CT_t.nii.gz", _blob(1), spacing=(1.0, 1.0, 3.0))
    return {}, [r"Case CT_t: reference .* has spacing"]


def _ev_non_integer(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1).astype(np.float32) * 0.5)
    _seg(pred / "CT_t.nii.gz", _blob(1))
    return {}, [r"CT_t.nii.gz holds non-integer values"]


def _ev_unreadable(ref, pred):
    (ref / "CT_t.nii.gz").write_bytes(b"no image")
    _seg(pred / "CT_t.nii.gz", _blob(1))
    return {}, [r"Cannot read .*CT_t.nii.gz"]


def _ev_case_of_no_task(ref, pred):
    _seg(ref / "Lung_t.nii.gz", _blob(1))
    _seg(pred / "Lung_t.nii.gz", _blob(1))
    return {}, [r"Reference file .*Lung_t.nii.gz"]


def _ev_unknown_task(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1))
    _seg(pred / "CT_t.nii.gz", _blob(1))
    return dict(task="Lung"), [r"Lung.*CT, MR"]


def _ev_origin_shifted(ref, pred):
    # the same voxels 100 mm away: comparing arrays would give Dice 1.0
    _seg(ref / "CT_t.nii.gz", _blob(1))
    _seg(pred / "CT_t.nii.gz", _blob(1), origin=(100.0, 0.0, 0.0))
    return {}, [r"Case CT_t: reference .*CT_t.nii.gz has origin \(0\.0, 0\.0, 0\.0\) but prediction "
                r".*CT_t.nii.gz has origin \(100\.0, 0\.0, 0\.0\)", r"--allow-geometry-mismatch"]


def _ev_direction_flipped(ref, pred):
    # physically the same labels stored flipped: comparing arrays would give Dice 0.0
    _seg(ref / "CT_t.nii.gz", _blob(1))
    _seg(pred / "CT_t.nii.gz", _blob(1)[:, :, ::-1], origin=(7.0, 0.0, 0.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    return {}, [r"Case CT_t: reference .* has origin .* but prediction .* has origin"]


def _ev_direction_only(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1))
    _seg(pred / "CT_t.nii.gz", _blob(1), direction=(0, 1, 0, 1, 0, 0, 0, 0, 1))
    return {}, [r"Case CT_t: reference .* has direction \(1\.0, 0\.0, 0\.0, 0\.0, 1\.0.* but prediction .* has "
                r"direction \(0\.0, 1\.0"]


def _ev_output_is_a_file(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1))
    _seg(pred / "CT_t.nii.gz", _blob(1))
    (ref.parent / "report.txt").write_text("not a folder")
    return dict(output_dir=ref.parent / "report.txt"), [r"-o .*report\.txt is an existing file, not a folder"]


def _ev_zero_byte_prediction(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1))
    (pred / "CT_t.nii.gz").write_bytes(b"")
    return {}, [r"Cannot read label file .*pred/CT_t.nii.gz: the file is empty \(0 bytes\)"]


def _ev_text_prediction(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1))
    (pred / "CT_t.nii.gz").write_text("case CT_t: organ everywhere\n")
    return {}, [r"Cannot read label file .*pred/CT_t.nii.gz: broken gzip stream"]


def _ev_truncated_prediction(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1))
    _seg(pred / "CT_t.nii.gz", _blob(1))
    _truncate(str(pred / "CT_t.nii.gz"), lambda n: n - 10)
    return {}, [r"Cannot read label file .*pred/CT_t.nii.gz: broken gzip stream \((EOFError|BadGzipFile)"]


def _ev_nan_reference(ref, pred):
    a = _blob(1).astype(np.float32)
    a[0, 0, 0] = np.nan
    _seg(ref / "CT_t.mha", a)
    _seg(pred / "CT_t.mha", _blob(1))
    return {}, [r"ref/CT_t.mha holds NaN or infinite values"]


def _ev_huge_prediction(ref, pred):
    _seg(ref / "CT_t.nii.gz", _blob(1))
    _seg(pred / "CT_t.nii.gz", _blob(1).astype(np.float64) * 3e12)
    return {}, [r"pred/CT_t.nii.gz holds values beyond the 32-bit integer range"]


EVALUATE = [_ev_origin_shifted, _ev_direction_flipped, _ev_direction_only, _ev_output_is_a_file,
            _ev_zero_byte_prediction, _ev_text_prediction, _ev_truncated_prediction, _ev_nan_reference,
            _ev_huge_prediction,
            _ev_merged_with_task, _ev_source_without_task, _ev_prediction_outside, _ev_missing_prediction, _ev_shape,
            _ev_spacing, _ev_non_integer, _ev_unreadable, _ev_case_of_no_task, _ev_unknown_task]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"evaluate:{c.__name__[4:]}") for c in EVALUATE])
def test_evaluate_refuses(sandbox, case):
    from pathlib import Path

    from nnunetv2_versemi.tasktable import TaskTableError

    ref, pred = Path(sandbox) / "ref", Path(sandbox) / "pred"
    ref.mkdir()
    pred.mkdir()
    kw, patterns = case(ref, pred)
    error = TaskTableError if case is _ev_unknown_task else EvaluationError
    args = dict(output_dir=Path(sandbox) / "eval_out")
    args.update(kw)
    _refused(sandbox, lambda: evaluate_folders(ref, pred, _eval_table(), **args), error, patterns)


# ---- predict: input folders that do not fit the model (checked before the model is loaded) -----------------
def _fake_model(root: str) -> str:
    """A model folder as nnU-Net writes it, as far as the input checks read it (the checkpoint is a stub)."""
    table = TaskTable(tasks=[
        Task(name="CT", source_dataset="Dataset901_CT", channel_names={"0": "CT"},
             labels=[TaskLabel("organ", 1, 1)], labeled=["CT_a"]),
        Task(name="Pro", source_dataset="Dataset902_Pro", channel_names={"0": "T2", "1": "ADC"},
             labels=[TaskLabel("gland", 1, 2)], channel=1, labeled=["Pro_a"]),
    ])
    model = os.path.join(root, "model")
    os.makedirs(os.path.join(model, "fold_0"))
    with open(os.path.join(model, "plans.json"), "w") as f:
        json.dump({TABLE_KEY: table.to_dict(), "original_median_spacing_after_transp": [1.0, 1.0, 1.0]}, f)
    with open(os.path.join(model, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "noNorm"}, "file_ending": ".nii.gz",
                   "labels": table.merged_label_dict()}, f)
    open(os.path.join(model, "fold_0", "checkpoint_final.pth"), "wb").close()
    return model


def _img(path, arr=None, vector=False):
    arr = np.zeros((4, 6, 6), np.float32) if arr is None else arr
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=vector), str(path))


def _pr_unknown_task(inp):
    _img(inp / "a_0000.nii.gz")
    return dict(task="Liver"), [r"Unknown task 'Liver'. Valid tasks: CT, Pro"]


def _pr_missing_fold(inp):
    _img(inp / "a_0000.nii.gz")
    return dict(task="CT", folds=["3"]), [r"Missing checkpoint_final.pth for fold\(s\) 3"]


def _pr_channel_count(inp):
    _img(inp / "a_0000.nii.gz")
    return dict(task="Pro"), [r"Case a has 1 channel file\(s\).*expects 2"]


def _pr_lone_second_channel(inp):
    _img(inp / "a_0001.nii.gz")
    return dict(task="CT"), [r"Case a .* has channel files \['_0001'\]"]


def _pr_vector_image(inp):
    _img(inp / "a_0000.nii.gz", np.zeros((4, 6, 6, 3), np.float32), vector=True)
    return dict(task="CT"), [r"Case a: .*a_0000.nii.gz is a 3-d image with 3 component"]


def _pr_4d_image(inp):
    vol = sitk.GetImageFromArray(np.zeros((4, 6, 6), np.float32))
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(inp / "a_0000.nii.gz"))
    return dict(task="CT"), [r"is a 4-d image"]


def _pr_no_images(inp):
    (inp / "notes.txt").write_text("no images here")
    return dict(task="CT"), [r"No images named CASE_XXXX.nii.gz"]


def _pr_missing_input(inp):
    return dict(task="CT", input_folder=str(inp / "nope")), [r"Input folder .*nope does not exist"]


def _pr_auto_fits_no_task(inp):
    for k in range(3):
        _img(inp / f"a_{k:04d}.nii.gz")
    return dict(task="auto"), [r"Case a \(3 channel file\(s\), .nii.gz\) fits no task"]


def _pr_not_a_model(inp):
    _img(inp / "a_0000.nii.gz")
    return dict(task="CT", model_folder=str(inp)), [r"is not a trained model folder \(no plans.json\)"]


def _pr_output_is_a_file(inp):
    _img(inp / "a_0000.nii.gz")
    (inp.parent / "out.nii.gz").write_bytes(b"an earlier prediction")
    return dict(task="CT", output_folder=str(inp.parent / "out.nii.gz")), [r"-o .*out.nii.gz is an existing file"]


def _pr_output_below_a_file(inp):
    _img(inp / "a_0000.nii.gz")
    (inp.parent / "results").write_text("x")
    return dict(task="CT", output_folder=str(inp.parent / "results" / "pred")), [r"results is a file, not a folder"]


def _pr_text_image(inp):
    (inp / "a_0000.nii.gz").write_text("not an image")
    return dict(task="CT"), [r"Case a: cannot read .*a_0000.nii.gz: broken gzip stream"]


def _pr_zero_byte_image(inp):
    (inp / "a_0000.nii.gz").write_bytes(b"")
    return dict(task="auto"), [r"Case a: cannot read .*a_0000.nii.gz: the file is empty \(0 bytes\)"]


def _pr_truncated_image(inp):
    _img(inp / "a_0000.nii.gz", np.random.default_rng(0).normal(size=(4, 6, 6)).astype(np.float32))
    _truncate(str(inp / "a_0000.nii.gz"), lambda n: n // 2)
    return dict(task="CT"), [r"Case a: cannot read .*a_0000.nii.gz: broken gzip stream"]


def _pr_2d_image(inp):
    _img(inp / "a_0000.nii.gz", np.zeros((6, 6), np.float32))
    return dict(task="CT"), [r"Case a: .*a_0000.nii.gz is a 2d image; the model was trained on 3d images"]


def _pr_overflowing_image(inp):
    a = np.zeros((4, 6, 6), np.float32)
    a[0, 0, 0], a[1, 1, 1] = 3e38, -3e38
    _img(inp / "a_0000.nii.gz", a)
    return dict(task="CT"), [r"Case a: .*a_0000.nii.gz holds 2 voxel\(s\) beyond \+-1e\+15 \(e.g. 3e\+38\)"]


def _pr_dataset_json_list(inp):
    _img(inp / "a_0000.nii.gz")
    model = _fake_model(str(inp / "m"))
    with open(os.path.join(model, "dataset.json"), "w") as f:
        json.dump([], f)
    return dict(task="CT", model_folder=model), [r"Model folder .*: .*dataset.json holds a JSON list"]


def _pr_plans_json_list(inp):
    _img(inp / "a_0000.nii.gz")
    model = _fake_model(str(inp / "m"))
    with open(os.path.join(model, "plans.json"), "w") as f:
        json.dump([1], f)
    return dict(task="CT", model_folder=model), [r"plans.json holds a JSON list, expected a JSON object"]


def _pr_channel_geometry(inp):
    _img(inp / "a_0000.nii.gz")
    img = sitk.GetImageFromArray(np.zeros((4, 6, 6), np.float32))
    img.SetOrigin((0.0, 0.0, 50.0))
    sitk.WriteImage(img, str(inp / "a_0001.nii.gz"))
    return dict(task="Pro"), [r"Case a: channel file .*a_0001.nii.gz does not match .*a_0000.nii.gz: origin"]


PREDICT = [_pr_output_is_a_file, _pr_channel_geometry, _pr_output_below_a_file, _pr_text_image, _pr_zero_byte_image, _pr_truncated_image,
           _pr_2d_image, _pr_overflowing_image, _pr_dataset_json_list, _pr_plans_json_list,
           _pr_unknown_task, _pr_missing_fold, _pr_channel_count, _pr_lone_second_channel, _pr_vector_image,
           _pr_4d_image, _pr_no_images, _pr_missing_input, _pr_auto_fits_no_task, _pr_not_a_model]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"predict:{c.__name__[4:]}") for c in PREDICT])
def test_predict_refuses(sandbox, case):
    from pathlib import Path

    model = _fake_model(sandbox)
    inp = Path(sandbox) / "input"
    inp.mkdir()
    kw, patterns = case(inp)
    args = dict(input_folder=str(inp), output_folder=os.path.join(sandbox, "out"), dataset="x", configuration="2d",
                folds=["0"], device="cpu", model_folder=model)
    args.update(kw)
    _refused(sandbox, lambda: P.run(**args), P.PredictionError, patterns)


# ---- extract_task: the name and id rules of the merge (nnUNetv2_versemi_extract_task) -----------------------
def _union_with_task_named(raw, name):
    """Rename a task in the union's table by hand (as a user editing dataset.json might)."""
    path = os.path.join(raw, "Dataset600_VerSemiUnion", "dataset.json")
    with open(path) as f:
        dj = json.load(f)
    dj[TABLE_KEY]["tasks"][0]["name"] = name
    with open(path, "w") as f:
        json.dump(dj, f)


# (extract_task keyword arguments, setup(raw) -> context or None, error, patterns)
EXTRACT = {
    "union-own-id": (dict(output_id=600), None, "TaskDatasetError",
                     [r"Output id 600 is the union's own id \(Dataset600_VerSemiUnion\)"]),
    "union-own-id-and-name": (dict(output_id=600, name="VerSemiUnion"), None, "TaskDatasetError",
                              [r"Output id 600 is the union's own id"]),
    "negative-id": (dict(output_id=-5), None, "TaskDatasetError", [r"Output dataset id must be 0\.\.999, got -5"]),
    "name-escapes": (dict(name="../../x"), None, "TaskDatasetError",
                     [r"Output dataset name '\.\./\.\./x' may only contain letters"]),
    "id-of-a-source": (dict(output_id=501, name="Other"), None, "TaskDatasetError",
                       [r"Dataset id 501 is already used by .*Dataset501_Liver"]),
    "task-name-merge-refuses": (dict(task="Li_ver"), lambda raw: _union_with_task_named(raw, "Li_ver"),
                                "TaskDatasetError", [r"Task name 'Li_ver' must be letters, digits or '-' only"]),
    "reserved-task-name": (dict(task="all"), lambda raw: _union_with_task_named(raw, "all"), "TaskDatasetError",
                           [r"Task name\(s\) \['all'\] are reserved"]),
    "second-writer": (dict(output_id=610), lambda raw: _held_lock(raw, 610), "WriterLockError",
                      [rf"Dataset id 610 in .* is being written by process {os.getpid()}"]),
}


@pytest.fixture(scope="module")
def merged_union(tmp_path_factory):
    """One merged union (Dataset600) copied into each row's sandbox: merging once keeps the rows fast."""
    base = tmp_path_factory.mktemp("union")
    raw = base / "nnUNet_raw"
    raw.mkdir()
    mp = pytest.MonkeyPatch()
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        mp.setenv(v, str(base / v))
    mp.setattr(N, "NNUNET_FOREGROUND_SAMPLES", 2e5)
    S.make_three(str(raw))
    M.merge_datasets([501, 502, 503], 600, num_processes=1, progress=False)
    mp.undo()
    return str(raw)


@pytest.mark.parametrize("row", sorted(EXTRACT), ids=lambda r: f"extract_task:{r}")
def test_extract_task_refused(sandbox, merged_union, row):
    import contextlib
    import shutil

    from nnunetv2_versemi import writers
    from nnunetv2_versemi.data import task_dataset as TD

    raw = os.path.join(sandbox, "nnUNet_raw")
    shutil.rmtree(raw)
    shutil.copytree(merged_union, raw)
    kw, setup, error, patterns = EXTRACT[row]
    args = dict(task="Liver")
    args.update(kw)
    held = (setup(raw) if setup else None) or contextlib.nullcontext()
    error = getattr(TD, error, None) or getattr(writers, error)
    with held:
        _refused(sandbox, lambda: TD.extract_task(600, **args), error, patterns)


# ---- plans presets ------------------------------------------------------------------------------------------
def _plans_file(sandbox: str, configurations: dict) -> str:
    path = os.path.join(sandbox, "nnUNetPlans.json")
    with open(path, "w") as f:
        json.dump({"plans_name": "nnUNetPlans", "configurations": configurations}, f)
    return path


def test_presets_refuse(sandbox):
    two_d = {"2d": {"patch_size": [64, 64], "batch_size": 2, "data_identifier": "nnUNetPlans_2d"}}
    path = _plans_file(sandbox, two_d)
    _refused(sandbox, lambda: apply_to_plans_file(path, "paper_96", skipped=[]), PlansPresetError,
             [r"no configuration of the preset fits.*'3d_fullres'"])
    _refused(sandbox, lambda: apply_to_plans_file(path, "no_such_preset"), PlansPresetError, [r"No plans preset"])
    bad = os.path.join(sandbox, "bad.json")
    with open(bad, "w") as f:
        f.write("{not json")
    _refused(sandbox, lambda: apply_to_plans_file(path, bad), PlansPresetError, [r"bad.json is not valid JSON"])
    _refused(sandbox, lambda: apply_to_plans_file(os.path.join(sandbox, "none.json"), "cpu_demo"),
             PlansPresetError, [r"none.json not found"])


def test_table_size():
    """docs/RELIABILITY.md quotes this count: keep them in step."""
    n = len(_merge_rows()) + 2 + len(MERGE_OUTPUTS) + len(EVALUATE) + len(PREDICT) + len(EXTRACT) + 4
    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "RELIABILITY.md")).read()
    assert f"{n} bad inputs tried, {n} refused with a clear error, 0 silent" in doc
