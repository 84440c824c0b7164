"""Demo data generator: layout, determinism, label content, nnU-Net compatibility, refusal of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunetv2_versemi.data import demo_data as demo
from nnunetv2_versemi.data.demo_data import generate_demo_datasets
from nnunetv2_versemi.entrypoints.data import demo_data_main as main

DEMO_NAMES = ["Dataset901_DemoCT", "Dataset902_DemoMR", "Dataset903_DemoMC"]
TINY = {"num_labeled": 1, "num_unlabeled": 0, "num_test": 0}


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("nnUNet_raw")
    names = generate_demo_datasets(out, seed=3, num_labeled=3, num_unlabeled=2, num_test=1)
    return out, names


def _read(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def _arrays(folder):
    return {p.relative_to(folder).as_posix(): _read(p)[0] for p in sorted(folder.rglob("*.nii.gz"))}


def _label_files(folder):
    return sorted((folder / "labelsTr").glob("*.nii.gz")) + sorted((folder / "labelsTs").glob("*.nii.gz"))


def test_layout_and_dataset_json(demo_raw):
    out, names = demo_raw
    assert names == DEMO_NAMES
    # temporary build folders are gone: only the finished datasets remain
    assert sorted(p.name for p in out.iterdir()) == DEMO_NAMES
    for name in names:
        folder = out / name
        meta = json.loads((folder / "dataset.json").read_text())
        assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
        assert list(meta["channel_names"]) == ["0"]
        counts = {
            sub: len(list((folder / sub).iterdir()))
            for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs")
        }
        assert counts == {"imagesTr": 3, "labelsTr": 3, "imagesUnlabeled": 2, "imagesTs": 1, "labelsTs": 1}
        # one numbering across splits, so ids stay unique when the merge pools a task's cases
        ids = sorted(p.name.removesuffix("_0000.nii.gz") for p in folder.glob("images*/*.nii.gz"))
        assert ids == [f"case_{i:03d}" for i in range(6)]
    channels = [json.loads((out / n / "dataset.json").read_text())["channel_names"]["0"] for n in names]
    assert channels == ["CT", "MRI", "CT"]


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a, b, c = (tmp_path / k for k in "abc")
    generate_demo_datasets(a, seed=7, **TINY)
    generate_demo_datasets(b, seed=7, **TINY)
    generate_demo_datasets(c, seed=8, **TINY)
    for name in DEMO_NAMES:
        first, again, other = _arrays(a / name), _arrays(b / name), _arrays(c / name)
        assert first.keys() == again.keys() == other.keys() and first
        for key in first:
            np.testing.assert_array_equal(first[key], again[key])
        assert not np.array_equal(
            first["imagesTr/case_000_0000.nii.gz"], other["imagesTr/case_000_0000.nii.gz"]
        )


def test_case_content_does_not_depend_on_other_split_counts(tmp_path):
    generate_demo_datasets(tmp_path / "few", seed=1, **TINY)
    generate_demo_datasets(tmp_path / "more", seed=1, num_labeled=1, num_unlabeled=2, num_test=1)
    for name in DEMO_NAMES:
        few, more = _arrays(tmp_path / "few" / name), _arrays(tmp_path / "more" / name)
        for key in few:
            np.testing.assert_array_equal(few[key], more[key])


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_passes_nnunet_integrity_check(demo_raw, name):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(demo_raw[0] / name), num_processes=1)


def test_labels_are_declared_uint8_and_every_class_present(demo_raw):
    out, names = demo_raw
    for name in names:
        declared = set(json.loads((out / name / "dataset.json").read_text())["labels"].values())
        for path in _label_files(out / name):
            label, image = _read(path)
            assert image.GetPixelID() == sitk.sitkUInt8, path
            assert set(np.unique(label).tolist()) == declared, path


def test_labels_line_up_with_visible_structures(demo_raw):
    # a label transposed or shifted against its image would sit on unremarkable tissue
    out, names = demo_raw
    for name in names:
        for path in sorted((out / name / "labelsTr").glob("*.nii.gz")):
            label = _read(path)[0] > 0
            image = _read(out / name / "imagesTr" / path.name.replace(".nii.gz", "_0000.nii.gz"))[0]
            ring = ndimage.binary_dilation(label, iterations=2) & ~label
            assert abs(image[label].mean() - image[ring].mean()) > 30, path


def test_lesion_lies_inside_organ(demo_raw):
    out = demo_raw[0]
    for path in _label_files(out / "Dataset903_DemoMC"):
        label, _ = _read(path)
        lesion = label == 2
        assert lesion.any()
        # no lesion voxel touches background: its 6-neighbourhood is organ or lesion
        assert (label[ndimage.binary_dilation(lesion)] > 0).all(), path
        image = _read(
            out
            / "Dataset903_DemoMC"
            / path.parent.name.replace("labels", "images")
            / path.name.replace(".nii.gz", "_0000.nii.gz")
        )[0]
        assert image[lesion].mean() < image[label == 1].mean()  # hypodense lesion


def test_tasks_differ_in_spacing_and_geometry_matches(demo_raw):
    out, names = demo_raw
    spacings = []
    for name in names:
        _, image = _read(out / name / "imagesTr" / "case_000_0000.nii.gz")
        _, label = _read(out / name / "labelsTr" / "case_000.nii.gz")
        for get in ("GetSpacing", "GetOrigin", "GetDirection", "GetSize"):
            np.testing.assert_allclose(getattr(image, get)(), getattr(label, get)())
        np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel())
        spacings.append(tuple(round(s, 4) for s in image.GetSpacing()))
    assert len(set(spacings)) == len(spacings)
    # SimpleITK reports (x, y, z): the declared (z, y, x) spacing of DemoCT is (2.5, 1.5, 1.5)
    assert spacings[0] == (1.5, 1.5, 2.5)


def test_paper_preset_and_scale_via_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    main(
        [
            "--preset",
            "paper",
            "--num-labeled",
            "1",
            "--num-unlabeled",
            "1",
            "--num-test",
            "0",
            "--scale",
            "0.5",
        ]
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "Dataset911_PaperPancreas",
        "Dataset912_PaperLA",
        "Dataset913_PaperSpleen",
        "Dataset914_PaperLung",
    ]
    label, image = _read(tmp_path / "Dataset911_PaperPancreas" / "labelsTr" / "case_000.nii.gz")
    # half the voxels per axis over the same field of view: doubled spacing
    assert label.shape == (12, 24, 24)
    np.testing.assert_allclose(image.GetSpacing(), (2.0, 2.0, 5.0))
    assert (tmp_path / "Dataset912_PaperLA" / "imagesUnlabeled" / "case_001_0000.nii.gz").is_file()


def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    generate_demo_datasets(tmp_path, seed=0, **TINY)
    before = _arrays(tmp_path / "Dataset902_DemoMR")
    with pytest.raises(FileExistsError, match="Dataset901_DemoCT"):
        generate_demo_datasets(tmp_path, seed=1, **TINY)
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path), "--num-labeled", "1"])
    assert "Dataset901_DemoCT already exists" in capsys.readouterr().err
    after = _arrays(tmp_path / "Dataset902_DemoMR")
    np.testing.assert_array_equal(
        before["imagesTr/case_000_0000.nii.gz"], after["imagesTr/case_000_0000.nii.gz"]
    )

    generate_demo_datasets(tmp_path, seed=1, overwrite=True, **TINY)
    replaced = _arrays(tmp_path / "Dataset902_DemoMR")
    assert not np.array_equal(
        before["imagesTr/case_000_0000.nii.gz"], replaced["imagesTr/case_000_0000.nii.gz"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == DEMO_NAMES


def test_refuses_a_foreign_dataset_with_the_same_id(tmp_path):
    (tmp_path / "Dataset902_Other").mkdir()
    with pytest.raises(FileExistsError, match="Dataset902_Other"):
        generate_demo_datasets(tmp_path, overwrite=True, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset902_Other"]
    assert generate_demo_datasets(tmp_path, first_id=501, **TINY)[1] == "Dataset502_DemoMR"


def test_failure_leaves_no_half_written_dataset(tmp_path, monkeypatch):
    calls = []

    def failing_write(array, grid, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")

    monkeypatch.setattr(demo, "_write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        generate_demo_datasets(tmp_path, num_labeled=2, num_unlabeled=0, num_test=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"preset": "nope"}, {"num_labeled": 0}, {"num_test": -1}, {"scale": 0}, {"seed": -1}, {"first_id": 0}],
)
def test_ill_arguments_write_nothing(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_demo_datasets(tmp_path / "out", **{**TINY, **kwargs})
    assert not (tmp_path / "out").exists()


def test_cli_needs_an_output(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit):
        main([])
    assert "nnUNet_raw is not set" in capsys.readouterr().err


def test_stock_nnunet_plans_and_preprocesses_2d(demo_raw, tmp_path, monkeypatch):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    monkeypatch.setenv("nnUNet_raw", str(demo_raw[0]))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    extract_fingerprints([901], num_processes=1, show_progress_bar=False)
    plans_identifier = plan_experiments([901])
    preprocess([901], plans_identifier, configurations=("2d",), num_processes=(1,), show_progress_bar=False)

    folder = tmp_path / "Dataset901_DemoCT"
    plans = json.loads((folder / f"{plans_identifier}.json").read_text())
    assert plans["configurations"]["2d"]["normalization_schemes"] == ["CTNormalization"]
    np.testing.assert_allclose(plans["original_median_spacing_after_transp"], [2.5, 1.5, 1.5])
    written = {p.name.split(".")[0] for p in (folder / f"{plans_identifier}_2d").iterdir()}
    assert {"case_000", "case_001", "case_002"} <= written


def test_a_small_class_at_half_scale_is_drawn_where_20_draws_were_not_enough():
    """DemoMC's lesion at --scale 0.5 has a few voxels; unlabeled case 2457 of seed 0 needed more than 20 draws
    (the pool benchmark's 10,000-image pool stopped there)."""
    task = next(t for t in demo.PRESETS["demo"]["tasks"] if t.name == "DemoMC")
    _, label, _ = demo.make_case(task, 0, 1, 2457, 0.5)
    counts = np.bincount(label.ravel(), minlength=len(task.labels) + 1)
    assert (counts[1:] > 0).all(), counts
