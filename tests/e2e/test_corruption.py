"""Random corruptions of valid inputs to merge, predict and evaluate: a clear error or a correct result, never a
traceback, never a changed source.

Each case copies a small valid input, corrupts one file (truncation, flipped bytes, another dimensionality, a
changed header geometry, extreme or non-finite values, an empty or text file) with a seeded generator, and runs
the library function the command calls: the merge itself, predict's checks that run before the model loads
(:func:`~nnunetv2_versemi.inference.predict.validate_inputs`) and the evaluation. An exception must be a
:class:`~nnunetv2_versemi.errors.VerSemiInputError` and leave every file as it was; a result must be what the
corrupted input, read independently, really holds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import traceback

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.imageio import GEOMETRY_ATOL, MAX_ABS_INTENSITY

import _synth as S  # tests/ is on sys.path (pyproject.toml: pytest's pythonpath)
from e2e.test_bad_inputs import _fake_model

N_MERGE, N_PREDICT, N_EVALUATE = 120, 150, 150
KINDS = ("truncate", "flip", "dimension", "geometry", "extreme", "replace")
EXTREME_IMAGE = (np.nan, np.inf, -np.inf, 3e38, -3e38, 1e20, -1e16, 2.0**31, 0.0, 1e10)
EXTREME_LABEL = (np.nan, np.inf, 3e38, -1.0, 0.5, 2.0, 3.0, 255.0, 1e10, 1.0)


def _tree(root: str) -> dict[str, str]:
    out = {}
    for d, _, fns in os.walk(root):
        for fn in fns:
            with open(os.path.join(d, fn), "rb") as f:
                out[os.path.relpath(os.path.join(d, fn), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def corrupt(path: str, rng: np.random.Generator, label: bool = False) -> str:
    """Corrupt the image file ``path`` in place in one of :data:`KINDS` ways; returns what was done."""
    kind = KINDS[rng.integers(len(KINDS))]
    data = open(path, "rb").read()
    if kind == "truncate":
        keep = int(rng.integers(0, len(data)))
        open(path, "wb").write(data[:keep])
        return f"truncated to {keep} of {len(data)} bytes"
    if kind == "flip":
        buf = bytearray(data)
        where = rng.integers(0, len(buf), size=int(rng.integers(1, 9)))
        for i in where:
            buf[i] ^= int(rng.integers(1, 256))
        open(path, "wb").write(bytes(buf))
        return f"bytes flipped at {sorted(where.tolist())}"
    if kind == "replace":
        content = [b"", b"not an image\n", b"\x1f\x8b", b"{}"][rng.integers(4)]
        open(path, "wb").write(content)
        return f"replaced by {content!r}"
    img = sitk.ReadImage(path)
    arr = sitk.GetArrayFromImage(img)
    if kind == "dimension":
        choice = int(rng.integers(3))
        if choice == 0:
            out = sitk.GetImageFromArray(arr[arr.shape[0] // 2])
        elif choice == 1:
            out = sitk.JoinSeries([img, img])
        else:
            out = sitk.GetImageFromArray(np.stack([arr] * 3, -1).astype(np.float32), isVector=True)
        sitk.WriteImage(out, path)
        return ["2d slice", "4d series", "vector image"][choice]
    if kind == "geometry":
        field = ["spacing", "origin", "direction", "noise"][rng.integers(4)]
        if field == "spacing":
            img.SetSpacing([s * float(rng.choice([0.5, 1.001, 2.0])) for s in img.GetSpacing()])
        elif field == "origin":
            img.SetOrigin([o + float(rng.choice([-100.0, 0.01, 5.0])) for o in img.GetOrigin()])
        elif field == "direction":
            d = np.array(img.GetDirection()).reshape(3, 3)
            img.SetDirection((d[:, rng.permutation(3)] * rng.choice([-1, 1], 3)).ravel().tolist())
        else:  # float noise far below the tolerance: must be accepted
            img.SetOrigin([o + 1e-6 for o in img.GetOrigin()])
        sitk.WriteImage(img, path, True)
        return f"header {field} changed"
    values = EXTREME_LABEL if label else EXTREME_IMAGE
    value = float(values[rng.integers(len(values))])
    arr = arr.astype(np.float32 if abs(value) < 3.4e38 or not np.isfinite(value) else np.float64)
    arr.flat[rng.integers(0, arr.size, size=2)] = value
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, path, True)
    return f"voxels set to {value}"


def _run(call, watched: list[str], what: str) -> tuple[object, str | None]:
    """(result, None) or (None, the error's message); fails on any other exception and on a changed file."""
    before = {w: _tree(w) for w in watched}
    try:
        result, error = call(), None
    except VerSemiInputError as e:
        result, error = None, str(e)
    except Exception:
        pytest.fail(f"{what}: a traceback instead of a clear error:\n{traceback.format_exc()}")
    for w in watched:
        assert _tree(w) == before[w], f"{what}: files under {w} changed"
    return result, error


def _geometry_equal(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-3, atol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=GEOMETRY_ATOL)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=GEOMETRY_ATOL))


def _usable_image(path: str) -> bool:
    img = sitk.ReadImage(path)
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    return img.GetDimension() == 3 and img.GetNumberOfComponentsPerPixel() == 1 and bool(
        np.all(np.isfinite(arr)) and np.abs(arr).max() <= MAX_ABS_INTENSITY)


# ---- merge ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merge_source(tmp_path_factory) -> str:
    raw = str(tmp_path_factory.mktemp("merge_source"))
    S.make_dataset(raw, 501, "Liver", "MR", n_train=2, n_unlabeled=1, shape=(8, 8, 8), seed=1)
    return os.path.join(raw, "Dataset501_Liver")


def test_merge_corruptions(merge_source, tmp_path, monkeypatch):
    from nnunetv2_versemi.data import merge as M

    files = sorted(os.path.relpath(os.path.join(d, f), merge_source) for d, _, fs in os.walk(merge_source)
                   for f in fs if f.endswith(".nii.gz"))
    rng = np.random.default_rng(2201)
    outcomes = {"error": 0, "result": 0}
    for i in range(N_MERGE):
        base = tmp_path / f"c{i}"
        for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (base / v).mkdir(parents=True)
            monkeypatch.setenv(v, str(base / v))
        raw = str(base / "nnUNet_raw")
        src = os.path.join(raw, "Dataset501_Liver")
        shutil.copytree(merge_source, src)
        rel = files[rng.integers(len(files))]
        what = f"merge case {i}: {rel} " + corrupt(os.path.join(src, rel), rng, label=rel.startswith("labels"))
        before = _tree(raw)
        result, error = _run(lambda: M.merge_datasets([501], 600, num_processes=1, progress=False), [src], what)
        if error is not None:
            assert _tree(raw) == before, f"{what}: a refused merge wrote something"
            outcomes["error"] += 1
            continue
        outcomes["result"] += 1
        union = str(result)
        for d, _, fs in os.walk(union):
            for f in fs:
                p = os.path.join(d, f)
                if f.endswith(".nii.gz") and "/images" in p:
                    assert _usable_image(p), f"{what}: the union holds an unusable image {p}"
                elif f.endswith(".nii.gz"):
                    labels = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(p))).tolist())
                    assert labels <= {0, 1}, f"{what}: union label {p} holds {labels}"
                    image = os.path.join(union, "imagesTr", f[: -len(".nii.gz")] + "_0000.nii.gz")
                    assert _geometry_equal(sitk.ReadImage(p), sitk.ReadImage(image)), f"{what}: {p} geometry"
        shutil.rmtree(base)
    assert outcomes["error"] > 0 and outcomes["result"] > 0, outcomes  # both kinds of outcome were exercised


# ---- predict (every check before the model loads) --------------------------------------------------------
@pytest.fixture(scope="module")
def predict_inputs(tmp_path_factory) -> tuple[str, str]:
    root = str(tmp_path_factory.mktemp("predict"))
    model = _fake_model(root)
    inp = os.path.join(root, "input")
    os.makedirs(inp)
    rs = np.random.RandomState(0)
    for case in ("ct1", "ct2"):
        S.write(rs.normal(0, 100, (6, 8, 8)).astype(np.float32), os.path.join(inp, f"{case}_0000.nii.gz"))
    return model, inp


def test_predict_corruptions(predict_inputs, tmp_path):
    from nnunetv2_versemi.inference import predict as P

    model, pristine = predict_inputs
    rng = np.random.default_rng(2202)
    outcomes = {"error": 0, "result": 0}
    for i in range(N_PREDICT):
        inp = str(tmp_path / f"in{i}")
        shutil.copytree(pristine, inp)
        f = sorted(os.listdir(inp))[rng.integers(2)]
        what = f"predict case {i}: {f} " + corrupt(os.path.join(inp, f), rng)
        task = ["CT", "auto"][rng.integers(2)]
        out = str(tmp_path / f"out{i}")
        result, error = _run(lambda inp=inp, out=out, task=task: P.validate_inputs(inp, out, model, ["0"], task),
                             [inp, model], what)
        assert not os.path.exists(out), f"{what}: the checks wrote {out}"
        if error is not None:
            outcomes["error"] += 1
            continue
        outcomes["result"] += 1
        _, cases = result
        assert sorted(cases) == ["ct1", "ct2"], f"{what}: cases {sorted(cases)}"
        for name in os.listdir(inp):
            assert _usable_image(os.path.join(inp, name)), f"{what}: accepted an unusable image {name}"
        shutil.rmtree(inp)
    assert outcomes["error"] > 0 and outcomes["result"] > 0, outcomes


# ---- evaluate ----------------------------------------------------------------------------------------------
def _table():
    from nnunetv2_versemi.tasktable import Task, TaskLabel, TaskTable

    return TaskTable(tasks=[
        Task(name="CT", source_dataset="Dataset901_CT", channel_names={"0": "CT"},
             labels=[TaskLabel("organ", 1, 1)], labeled=["CT_a"], test=["CT_t"]),
        Task(name="MR", source_dataset="Dataset902_MR", channel_names={"0": "MR"},
             labels=[TaskLabel("heart", 1, 2)], labeled=["MR_a"], test=["MR_t"]),
    ])


@pytest.fixture(scope="module")
def evaluate_inputs(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("evaluate")
    rs = np.random.RandomState(0)
    for sub in ("ref", "pred"):
        (root / sub).mkdir()
        for case, value in (("CT_t", 1), ("MR_t", 2)):
            seg = np.zeros((6, 8, 8), np.uint8)
            seg[1:5, 2:6, 2:7] = value
            if sub == "pred":
                seg[rs.rand(*seg.shape) < 0.1] = 0
            S.write(seg, str(root / sub / f"{case}.nii.gz"))
    return str(root)


def _dice(ref: np.ndarray, pred: np.ndarray, v: int) -> float:
    a, b = ref == v, pred == v
    return 1.0 if a.sum() + b.sum() == 0 else 2 * (a & b).sum() / (a.sum() + b.sum())


def test_evaluate_corruptions(evaluate_inputs, tmp_path):
    from nnunetv2_versemi.evaluation.evaluate import evaluate_folders

    rng = np.random.default_rng(2203)
    outcomes = {"error": 0, "result": 0}
    for i in range(N_EVALUATE):
        root = tmp_path / f"c{i}"
        shutil.copytree(evaluate_inputs, root)
        rel = ["ref", "pred"][rng.integers(2)] + "/" + ["CT_t", "MR_t"][rng.integers(2)] + ".nii.gz"
        what = f"evaluate case {i}: {rel} " + corrupt(str(root / rel), rng, label=True)
        out = root / "eval"
        result, error = _run(lambda root=root, out=out: evaluate_folders(root / "ref", root / "pred", _table(), output_dir=out),
                             [str(root / "ref"), str(root / "pred")], what)
        if error is not None:
            assert not out.exists(), f"{what}: a refused evaluation wrote {out}"
            outcomes["error"] += 1
            continue
        outcomes["result"] += 1
        for case, v in (("CT_t", 1), ("MR_t", 2)):
            ref, pred = sitk.ReadImage(str(root / "ref" / f"{case}.nii.gz")), sitk.ReadImage(
                str(root / "pred" / f"{case}.nii.gz"))
            assert _geometry_equal(ref, pred), f"{what}: {case} scored across different geometries"
            expected = _dice(sitk.GetArrayFromImage(ref), sitk.GetArrayFromImage(pred), v)
            got = result["cases"][case]["metrics"]["organ" if v == 1 else "heart"]["dice"]
            assert got == pytest.approx(expected), f"{what}: {case} Dice {got}, the files hold {expected}"
        shutil.rmtree(root)
    assert outcomes["error"] > 0 and outcomes["result"] > 0, outcomes


def test_corruption_case_count():
    assert N_MERGE + N_PREDICT + N_EVALUATE >= 200
