"""nnUNetv2_versemi_merge: union layout, label remapping, per-task normalization, selection, bad input."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_versemi.data import merge as M
from nnunetv2_versemi.data import normalization as N
from nnunetv2_versemi.entrypoints.data import merge_main
from nnunetv2_versemi.nnunet_paths import DatasetNotFoundError
from nnunetv2_versemi.tasktable import TaskTable

import _synth as S  # tests/ is on sys.path (pyproject.toml: pytest's pythonpath)

# fewer CT foreground draws than nnU-Net's 10^8 keep the tests fast; the nnU-Net comparisons below use the same
# budget on the stock side, so they still test the exact computation
SAMPLES = 2e5


@pytest.fixture
def raw(tmp_path, monkeypatch):
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / v).mkdir()
        monkeypatch.setenv(v, str(tmp_path / v))
    monkeypatch.setattr(N, "NNUNET_FOREGROUND_SAMPLES", SAMPLES)
    return str(tmp_path / "nnUNet_raw")


def _merge(raw_dir, sources=(501, 502, 503), out=600, **kw):
    kw.setdefault("num_processes", 1)
    kw.setdefault("progress", False)
    return M.merge_datasets(list(sources), out, **kw)


def _table(folder) -> TaskTable:
    with open(os.path.join(folder, "dataset.json")) as f:
        return TaskTable.from_dataset_json(json.load(f))


def _source_image(source_folder: str, source_case: str) -> str:
    sub = {"tr": "imagesTr", "un": "imagesUnlabeled", "ts": "imagesTs"}[source_case[3:5]]  # _synth case names
    return os.path.join(source_folder, sub, f"{source_case}_0000.nii.gz")


def _nnunet_ct_properties(source_folder: str, cases: list[str], total: float) -> dict:
    """Intensity properties exactly as nnU-Net's DatasetFingerprintExtractor computes them for these cases."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    n = int(total // len(cases))
    fg = [
        DatasetFingerprintExtractor.analyze_case(
            [os.path.join(source_folder, "imagesTr", f"{c}_0000.nii.gz")],
            os.path.join(source_folder, "labelsTr", f"{c}.nii.gz"),
            SimpleITKIO,
            n,
        )[2][0]
        for c in cases
    ]
    # the aggregation of DatasetFingerprintExtractor.run
    fg = np.concatenate(fg)
    p005, median, p995 = np.percentile(fg, np.array((0.5, 50.0, 99.5)))
    return {
        "mean": float(np.mean(fg)),
        "std": float(np.std(fg)),
        "percentile_00_5": float(p005),
        "percentile_99_5": float(p995),
        "median": float(median),
    }


# ---- the union ---------------------------------------------------------------------------------------------


def test_merge_layout_table_geometry_and_sources_untouched(raw):
    srcs = S.make_three(raw)
    before = {s: S.tree_hash(s) for s in srcs}
    out = _merge(raw)
    assert out == os.path.join(raw, "Dataset600_VerSemiUnion")
    assert {s: S.tree_hash(s) for s in srcs} == before, "sources must never be modified"
    assert sorted(os.listdir(raw)) == sorted([*map(os.path.basename, srcs), "Dataset600_VerSemiUnion"])

    with open(os.path.join(out, "dataset.json")) as f:
        dj = json.load(f)
    table = TaskTable.from_dataset_json(dj)
    assert table.names == ["Liver", "Atrium", "Kidney"]
    assert dj["channel_names"] == {"0": "noNorm"}
    assert dj["labels"] == {
        "background": 0,
        "Liver_organ": 1,
        "Atrium_organ": 2,
        "Kidney_left": 3,
        "Kidney_right": 4,
    }
    assert dj["file_ending"] == ".nii.gz"
    liver, atrium, kidney = table.tasks
    assert liver.labeled == [f"Liver_livtr{i:03d}" for i in range(4)]
    assert liver.unlabeled == ["Liver_livun000", "Liver_livun001"]
    assert liver.test == ["Liver_livts000"]
    assert atrium.unlabeled == [] and kidney.test == [] and kidney.unlabeled == ["Kidney_kidun000"]
    assert [(lab.name, lab.source, lab.merged) for lab in kidney.labels] == [("left", 1, 3), ("right", 2, 4)]
    assert liver.normalization["scheme"] == "CT" and atrium.normalization == {"scheme": "zscore"}
    assert liver.source_dataset == "Dataset501_Liver" and liver.channel_names == {"0": "CT"}
    assert liver.file_ending == ".nii.gz" and liver.channel is None
    assert dj["numTraining"] == 11 == sum(len(t.labeled) for t in table.tasks)

    def ids(sub, suffix):
        return sorted(f[: -len(suffix)] for f in os.listdir(os.path.join(out, sub)))

    labeled = sorted(c for t in table.tasks for c in t.labeled)
    assert ids("imagesTr", "_0000.nii.gz") == labeled == ids("labelsTr", ".nii.gz")
    assert ids("imagesUnlabeled", "_0000.nii.gz") == sorted(c for t in table.tasks for c in t.unlabeled)
    assert (
        ids("imagesTs", "_0000.nii.gz")
        == sorted(c for t in table.tasks for c in t.test)
        == ids("labelsTs", ".nii.gz")
    )
    with open(os.path.join(out, "splits_final.json")) as f:
        splits = json.load(f)
    assert len(splits) == 5 and all(sorted(s["train"] + s["val"]) == labeled for s in splits)

    # geometry preserved, float32 images, integer labels
    src = sitk.ReadImage(os.path.join(srcs[0], "imagesTs", "livts000_0000.nii.gz"))
    for f in ("imagesTs/Liver_livts000_0000.nii.gz", "labelsTs/Liver_livts000.nii.gz"):
        img = sitk.ReadImage(os.path.join(out, f))
        assert img.GetSize() == src.GetSize()
        assert np.allclose(img.GetSpacing(), src.GetSpacing())
        assert np.allclose(img.GetOrigin(), src.GetOrigin())
        assert np.allclose(img.GetDirection(), src.GetDirection())
    assert (
        sitk.ReadImage(os.path.join(out, "imagesTr/Atrium_atrtr000_0000.nii.gz")).GetPixelID()
        == sitk.sitkFloat32
    )


def test_label_remapping_is_exact(raw):
    srcs = S.make_three(raw)
    out = _merge(raw)
    table = _table(out)
    for task, src in zip(table.tasks, srcs):
        lut = {0: 0, **{lab.source: lab.merged for lab in task.labels}}
        for cid, sub_src, sub_out in [(c, "labelsTr", "labelsTr") for c in task.labeled] + [
            (c, "labelsTs", "labelsTs") for c in task.test
        ]:
            source_case = cid[len(task.name) + 1 :]
            s = S.read(os.path.join(src, sub_src, source_case + ".nii.gz"))
            m = S.read(os.path.join(out, sub_out, cid + ".nii.gz"))
            assert np.array_equal(m, np.vectorize(lut.get)(s)), cid
    # the two-class task keeps both classes
    m = S.read(os.path.join(out, "labelsTr", "Kidney_kidtr000.nii.gz"))
    assert set(np.unique(m)) == {0, 3, 4}


@pytest.mark.parametrize("labeled_fraction", [None, 0.5])
def test_ct_normalization_equals_nnunet_on_the_source(raw, labeled_fraction):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    srcs = S.make_three(raw)
    out = _merge(raw, labeled_fraction=labeled_fraction)
    liver = _table(out).tasks[0]
    cases = [c[len("Liver_") :] for c in liver.labeled]
    assert len(cases) == (4 if labeled_fraction is None else 2)
    props = _nnunet_ct_properties(srcs[0], cases, SAMPLES)  # from the labeled cases only
    nz = liver.normalization
    assert nz["lower"] == pytest.approx(props["percentile_00_5"], rel=1e-6)
    assert nz["upper"] == pytest.approx(props["percentile_99_5"], rel=1e-6)
    assert nz["mean"] == pytest.approx(props["mean"], rel=1e-5)
    assert nz["std"] == pytest.approx(props["std"], rel=1e-5)
    for cid, sub in [
        (liver.labeled[0], "imagesTr"),
        (liver.unlabeled[0], "imagesUnlabeled"),
        (liver.test[0], "imagesTs"),
    ]:
        image = S.read(_source_image(srcs[0], cid[len("Liver_") :])).astype(np.float32)
        expected = CTNormalization(use_mask_for_norm=False, intensityproperties=props).run(image)
        got = S.read(os.path.join(out, sub, f"{cid}_0000.nii.gz"))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_zscore_normalization_equals_nnunet(raw):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization

    srcs = S.make_three(raw)
    out = _merge(raw)
    for sub_src, case, sub_out, cid in [
        ("imagesTr", "atrtr001", "imagesTr", "Atrium_atrtr001"),
        ("imagesTs", "atrts000", "imagesTs", "Atrium_atrts000"),
    ]:
        image = S.read(os.path.join(srcs[1], sub_src, f"{case}_0000.nii.gz"))
        expected = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(image)
        np.testing.assert_allclose(
            S.read(os.path.join(out, sub_out, f"{cid}_0000.nii.gz")), expected, atol=1e-6
        )


def test_foreground_samples_are_nnunets_draws(monkeypatch):
    """Same draws as nnU-Net's collect_foreground_intensities, also when drawn in chunks; same statistics."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    rs = np.random.RandomState(0)
    images = rs.randint(-50, 200, size=(2, 6, 7, 8)).astype(np.float32)
    images[:, 0] = 0  # a zero border that crop_to_nonzero removes
    seg = (rs.rand(1, 6, 7, 8) > 0.6).astype(np.float32)
    monkeypatch.setattr(N, "_DRAW_CHUNK", 1000)
    ours = N.case_foreground_samples(images, seg, 2500)
    d, s, _ = crop_to_nonzero(images, seg.copy())
    theirs, _ = DatasetFingerprintExtractor.collect_foreground_intensities(s, d, num_samples=2500)
    few = N.case_foreground_samples(images, seg, 3)  # fewer draws than values: undrawn values left out
    assert [f[1].sum() for f in few] == [3, 3] and all(len(f[0]) <= 3 for f in few)
    for (values, counts), t in zip(ours, theirs):
        tv, tc = np.unique(t, return_counts=True)
        assert np.array_equal(values, tv) and np.array_equal(counts, tc)
    # only channel 1 wanted: channel 0 still consumes the random stream, as in nnU-Net
    only1 = N.case_foreground_samples(images, seg, 2500, channels=[1])
    assert len(only1) == 1 and np.array_equal(only1[0][1], ours[1][1])

    pooled = np.concatenate(theirs)
    props = N.intensity_properties(*N.merge_samples(ours))
    assert props["min"] == pooled.min() and props["max"] == pooled.max()
    for q, k in ((0.5, "percentile_00_5"), (50.0, "median"), (99.5, "percentile_99_5")):
        assert props[k] == pytest.approx(float(np.percentile(pooled, q)), rel=1e-12)
    assert props["mean"] == pytest.approx(float(pooled.mean()), rel=1e-6)
    assert props["std"] == pytest.approx(float(pooled.std()), rel=1e-6)


def test_normalize_task_image_schemes():
    img = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    out = N.normalize_task_image(img, {"scheme": "CT", "mean": 10.0, "std": 2.0, "lower": 0.0, "upper": 20.0})
    assert out.dtype == np.float32 and img[0, 0, 0, 0] == 0  # input untouched
    np.testing.assert_allclose(out, (np.clip(img, 0, 20) - 10) / 2)
    z = N.normalize_task_image(img, {"scheme": "zscore"})
    np.testing.assert_allclose(z[1], (img[1] - img[1].mean()) / img[1].std(), rtol=1e-5)
    mixed = N.normalize_task_image(
        img, {"scheme": "per_channel", "channels": [{"scheme": "noNorm"}, {"scheme": "zscore"}]}
    )
    np.testing.assert_array_equal(mixed[0], img[0])
    with pytest.raises(N.NormalizationError):
        N.normalize_task_image(img, {"scheme": "per_channel", "channels": [{"scheme": "zscore"}]})
    with pytest.raises(N.NormalizationError):
        N.normalize_task_image(img, {"scheme": "CT", "mean": 1.0})
    assert N.scheme_for_channel_name("ct") == "CT" and N.scheme_for_channel_name("T2") == "zscore"


# ---- selection ---------------------------------------------------------------------------------------------


def test_labeled_fraction_cases_and_test_fraction(raw):
    S.make_three(raw, n_train=(10, 5, 3), n_unlabeled=(0, 0, 0), n_test=(0, 0, 0))
    t = _table(_merge(raw, labeled_fraction=0.2))
    assert [len(x.labeled) for x in t.tasks] == [2, 1, 1]  # round(0.2 n), at least one
    assert [len(x.unlabeled) for x in t.tasks] == [8, 4, 2]
    t2 = _table(_merge(raw, out=601, labeled_fraction=0.2))
    assert [x.labeled for x in t2.tasks] == [x.labeled for x in t.tasks]  # seeded
    t3 = _table(_merge(raw, out=602, labeled_fraction=0.2, seed=7))
    assert [x.labeled for x in t3.tasks] != [x.labeled for x in t.tasks]

    t = _table(_merge(raw, out=603, labeled_cases=4, test_fraction=0.2))
    assert [len(x.test) for x in t.tasks] == [2, 1, 1]
    assert [len(x.labeled) for x in t.tasks] == [4, 4, 2]
    assert [len(x.unlabeled) for x in t.tasks] == [4, 0, 0]
    for x in t.tasks:
        assert not set(x.test) & (set(x.labeled) | set(x.unlabeled))
    out = os.path.join(raw, "Dataset603_VerSemiUnion")
    assert len(os.listdir(os.path.join(out, "labelsTs"))) == 4  # held-out cases keep their labels
    assert len(os.listdir(os.path.join(out, "labelsTr"))) == 10


def test_per_task_labeled_cases(raw, capsys):
    S.make_three(raw, n_train=(10, 5, 3), n_unlabeled=(0, 0, 0), n_test=(0, 0, 0))
    common = ["-np", "1", "--no-pbar"]
    merge_main(["-d", "501", "502", "503", "-o", "604", "--labeled-cases", "Liver=3", "Kidney=2", *common])
    t = _table(os.path.join(raw, "Dataset604_VerSemiUnion"))
    assert [len(x.labeled) for x in t.tasks] == [3, 5, 2]  # Atrium not named: all its labels
    assert [len(x.unlabeled) for x in t.tasks] == [7, 0, 1]
    # a number for every task, overridden per task; the same draw as a plain number for the others
    merge_main(["-d", "501", "502", "503", "-o", "605", "--labeled-cases", "2", "Atrium=4", *common])
    t2 = _table(os.path.join(raw, "Dataset605_VerSemiUnion"))
    assert [len(x.labeled) for x in t2.tasks] == [2, 4, 2]
    t3 = _table(_merge(raw, out=606, labeled_cases=2))
    assert t2.tasks[0].labeled == t3.tasks[0].labeled and t2.tasks[2].labeled == t3.tasks[2].labeled
    for bad, message in ((["Spleen=3"], "--labeled-cases names unknown task"), (["Liver=x"], "N or TASK=N"),
                         (["Liver=0"], "at least 1"), (["Liver=1", "Liver=2"], "gives Liver twice")):
        with pytest.raises(SystemExit) as e:
            merge_main(["-d", "501", "502", "503", "-o", "607", "--labeled-cases", *bad, *common])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(raw, "Dataset607_VerSemiUnion"))


def test_multichannel_and_channel_pick(raw):
    S.make_dataset(raw, 501, "Prostate", "MR", 3, channels=2, seed=1)
    S.make_dataset(raw, 502, "Atrium", "MR", 3, seed=2)
    S.make_dataset(raw, 503, "Brain", "MR", 3, channels=2, seed=3)
    with pytest.raises(
        M.MergeError, match=r"different numbers of channels.*Prostate.*2.*Atrium.*1.*--channel"
    ):
        _merge(raw, (501, 502))
    assert len(os.listdir(raw)) == 3

    out = _merge(raw, (501, 503))
    with open(os.path.join(out, "dataset.json")) as f:
        assert json.load(f)["channel_names"] == {"0": "noNorm", "1": "noNorm"}
    assert _table(out).tasks[0].normalization == {"scheme": "zscore"}  # both channels alike: one dict
    assert len(os.listdir(os.path.join(out, "imagesTr"))) == 12

    out = _merge(raw, (501, 502), out=601, channels={"Prostate": 1})
    t = _table(out)
    assert t.tasks[0].channel == 1 and t.tasks[1].channel is None
    src = S.read(os.path.join(raw, "Dataset501_Prostate", "imagesTr", "protr000_0001.nii.gz"))
    got = S.read(os.path.join(out, "imagesTr", "Prostate_protr000_0000.nii.gz"))
    np.testing.assert_allclose(got, (src - src.mean()) / src.std(), rtol=1e-4, atol=1e-5)
    assert N.prepare_raw_task_image(np.stack([src * 0, src]), t.tasks[0]).shape == (1, *src.shape)


def test_overwrite_and_workers(raw):
    S.make_three(raw, n_train=(3, 3, 2), n_unlabeled=(1, 0, 0), n_test=(0, 0, 0))
    out = _merge(raw, num_processes=2)  # spawn workers
    ref = S.tree_hash(out)
    with pytest.raises(M.MergeError, match="already exists.*--overwrite"):
        _merge(raw)
    _merge(raw, overwrite=True)
    assert S.tree_hash(out) == ref  # same result in-process and with workers
    assert not [d for d in os.listdir(raw) if d.startswith(".")]


# ---- bad input: the table of broken sources is in test_bad_inputs.py --------------------------------------


def test_overwrite_replaces_only_unions_and_stale_temporaries_go(raw):
    S.make_three(raw)
    plain = os.path.join(raw, "Dataset600_Plain")
    os.makedirs(plain)
    with open(os.path.join(plain, "dataset.json"), "w") as f:
        json.dump({"name": "not a union", "labels": {"background": 0}}, f)
    with pytest.raises(M.MergeError, match="only replaces a union dataset"):
        _merge(raw, out=600, output_name="Plain", overwrite=True)
    assert os.listdir(plain) == ["dataset.json"]
    # a merge killed with SIGKILL leaves its hidden folder behind; the next merge removes it (dead PID only)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = os.path.join(raw, f".Dataset601_X.tmp-{dead.pid}")
    alive = os.path.join(raw, f".Dataset602_Y.tmp-{os.getpid()}")
    os.makedirs(stale)
    os.makedirs(alive)
    folder = _merge(raw, out=601, output_name="X")
    assert not os.path.exists(stale) and os.path.isdir(alive) and os.path.isdir(folder)
    # a union is replaced by --overwrite
    _merge(raw, out=601, output_name="X", overwrite=True)


def test_empty_unlabeled_folder_is_no_error(raw, capsys):
    S.make_three(raw)
    empty = os.path.join(raw, "Dataset502_Atrium", "imagesUnlabeled")
    for f in os.listdir(empty) if os.path.isdir(empty) else []:
        os.remove(os.path.join(empty, f))
    os.makedirs(empty, exist_ok=True)
    folder = _merge(raw, progress=True)
    assert "imagesUnlabeled is empty: no unlabeled images" in capsys.readouterr().out
    atrium = next(t for t in _table(folder).tasks if t.name == "Atrium")
    assert atrium.unlabeled == [] and atrium.labeled


def test_ill_dataset_and_output(raw):
    S.make_three(raw)
    with pytest.raises(DatasetNotFoundError, match="Unknown dataset '999': no dataset of that id or name in nnUNet_raw="):
        _merge(raw, (501, 999))
    with pytest.raises(DatasetNotFoundError, match="Unknown dataset 'Dataset777_Nope'"):
        _merge(raw, (501, "Dataset777_Nope"))
    with pytest.raises(M.MergeError, match="one of the source datasets"):
        _merge(raw, out=501)
    with pytest.raises(M.MergeError, match="--unlabeled-dir names unknown task"):
        _merge(raw, unlabeled_dirs={"Lung": raw})
    assert len(os.listdir(raw)) == 3


def test_cli(raw, capsys):
    S.make_three(raw, n_train=(2, 2, 2), n_unlabeled=(0, 0, 0), n_test=(0, 0, 0))
    merge_main(
        [
            "-d",
            "501",
            "Dataset502_Atrium",
            "503",
            "-o",
            "610",
            "-n",
            "Mix",
            "--task-names",
            "A",
            "B",
            "C",
            "--labeled-cases",
            "1",
            "-np",
            "1",
            "--no-pbar",
        ]
    )
    t = _table(os.path.join(raw, "Dataset610_Mix"))
    assert t.names == ["A", "B", "C"] and [len(x.labeled) for x in t.tasks] == [1, 1, 1]
    with pytest.raises(SystemExit) as e:
        merge_main(["-d", "501", "-o", "610", "-n", "Mix", "-np", "1", "--no-pbar"])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        merge_main(["-d", "501", "-o", "611", "--labeled-fraction", "0.5", "--labeled-cases", "1"])


def test_merges_the_demo_generator_output(raw):
    from nnunetv2_versemi.data.demo_data import generate_demo_datasets

    names = generate_demo_datasets(raw, num_labeled=2, num_unlabeled=1, num_test=1, scale=0.5)
    t = _table(_merge(raw, names, out=620))
    assert [x.source_dataset for x in t.tasks] == names
    assert [len(x.labeled) for x in t.tasks] == [2, 2, 2] and t.tasks[0].normalization["scheme"] == "CT"
    assert t.num_merged_labels == 1 + sum(len(x.labels) for x in t.tasks)


def test_task_dataset_is_one_task_of_the_union(raw):
    from nnunetv2_versemi.data.task_dataset import SOURCE_KEY, TaskDatasetError, write_task_dataset

    S.make_three(raw, n_train=(4, 4, 3))
    _merge(raw, labeled_cases={"Kidney": 2})
    union = os.path.join(raw, "Dataset600_VerSemiUnion")
    table = _table(union)
    kidney = table.tasks[table.index("Kidney")]
    before = S.tree_hash(union)
    name, written = write_task_dataset(600, "Kidney", "Dataset610_Kidney")
    assert (name, written) == ("Dataset610_Kidney", True)
    folder = os.path.join(raw, name)
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["labels"] == {"background": 0, **{f"Kidney_{lab.name}": i for i, lab in enumerate(kidney.labels, 1)}}
    assert dj["channel_names"] == {"0": "noNorm"} and dj["numTraining"] == 2
    one = TaskTable.from_dataset_json(dj)
    assert one.names == ["Kidney"] and one.tasks[0].labeled == sorted(kidney.labeled) and not one.tasks[0].unlabeled
    assert [lab.merged for lab in one.tasks[0].labels] == [1, 2]
    fe = dj["file_ending"]
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == sorted(c + fe for c in kidney.labeled)
    for c in kidney.labeled:
        merged = S.read(os.path.join(union, "labelsTr", c + fe))
        local = S.read(os.path.join(folder, "labelsTr", c + fe))
        # merged values of Kidney -> 1..K; the image is the union's file
        np.testing.assert_array_equal(local, table.tasks[table.index("Kidney")].merged_to_local_lut(
            table.num_merged_labels)[merged])
        assert local.max() == 2
        np.testing.assert_array_equal(S.read(os.path.join(folder, "imagesTr", f"{c}_0000{fe}")),
                                      S.read(os.path.join(union, "imagesTr", f"{c}_0000{fe}")))
    with open(os.path.join(folder, "splits_final.json")) as f:
        splits = json.load(f)
    assert all(set(s["train"]) | set(s["val"]) == set(kidney.labeled) for s in splits)
    assert S.tree_hash(union) == before  # the union is only read
    # unchanged union: kept as is; after a re-merge with other labeled cases: refused, or rebuilt on request
    assert write_task_dataset(600, "Kidney", name) == (name, False)
    _merge(raw, labeled_cases={"Kidney": 1}, overwrite=True)
    with pytest.raises(TaskDatasetError, match="other labeled cases"):
        write_task_dataset(600, "Kidney", name)
    assert write_task_dataset(600, "Kidney", name, replace=True) == (name, True)
    with open(os.path.join(folder, "dataset.json")) as f:
        assert len(json.load(f)[SOURCE_KEY]["labeled"]) == 1
    with pytest.raises(TaskDatasetError, match="no task 'Spleen'"):
        write_task_dataset(600, "Spleen", "Dataset611_Spleen")
    os.makedirs(os.path.join(raw, "Dataset612_Mine"))
    with open(os.path.join(raw, "Dataset612_Mine", "dataset.json"), "w") as f:
        json.dump({"name": "mine"}, f)
    with pytest.raises(TaskDatasetError, match="not a task dataset written by"):
        write_task_dataset(600, "Kidney", "Dataset612_Mine")
    # written by the benchmark of an earlier version (its own mark, no task table): kept when its record
    # matches, else rebuilt only on request
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    dj["versemi_benchmark"] = dj.pop(SOURCE_KEY)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dj, f)
    assert write_task_dataset(600, "Kidney", name) == (name, False)
    dj["versemi_benchmark"]["labeled"] = ["another_case"]
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dj, f)
    with pytest.raises(TaskDatasetError, match="earlier version"):
        write_task_dataset(600, "Kidney", name)
    assert write_task_dataset(600, "Kidney", name, replace=True) == (name, True)
    assert not [d for d in os.listdir(raw) if d.startswith(".")]  # no temporary folder left behind


def test_extract_task_command(raw, capsys):
    from nnunetv2_versemi.entrypoints.data import extract_task_main

    S.make_three(raw)
    _merge(raw)
    extract_task_main(["-d", "600", "-t", "Liver"])
    out = capsys.readouterr().out
    assert "Wrote Dataset601_Liver" in out  # the first free id after the union
    with open(os.path.join(raw, "Dataset601_Liver", "dataset.json")) as f:
        assert TaskTable.from_dataset_json(json.load(f)).names == ["Liver"]
    extract_task_main(["-d", "600", "-t", "Liver", "-o", "601"])
    assert "Kept (up to date) Dataset601_Liver" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        extract_task_main(["-d", "600", "-t", "Spleen", "-o", "602"])
    assert e.value.code == 2 and "no task 'Spleen'" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(raw, "Dataset602_Spleen"))
