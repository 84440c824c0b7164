"""Evaluation: metric values checked against hand-computed numbers, per-task scoring, outputs, bad input."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_versemi.entrypoints.evaluation import evaluate_main as main
from nnunetv2_versemi.evaluation.evaluate import (
    CSV_COLUMNS,
    EvaluationError,
    evaluate_folders,
)
from nnunetv2_versemi.evaluation.metrics import aggregate, binary_metrics, compute_case_metrics
from nnunetv2_versemi.tasktable import Task, TaskLabel, TaskTable, TaskTableError, find_task_table


# ---- metrics on constructed masks ------------------------------------------------------------------
def cube(shape, lo, hi):
    m = np.zeros(shape, dtype=np.uint8)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return m


def test_dice_iou_of_overlapping_cubes():
    # A: 4^3 = 64 voxels, B: A shifted by 2 along axis 0 -> |A∩B| = 2*4*4 = 32
    a = cube((10, 10, 10), (0, 0, 0), (4, 4, 4))
    b = cube((10, 10, 10), (2, 0, 0), (6, 4, 4))
    m = binary_metrics(a, b)
    assert m["tp"] == 32 and m["fp"] == 32 and m["fn"] == 32
    assert m["dice"] == 2 * 32 / (64 + 64)
    assert m["iou"] == 32 / (64 + 64 - 32)


@pytest.mark.parametrize(
    "axis, spacing, shift, expected_hd95",
    [
        (0, (3.0, 1.0, 1.0), 2, 6.0),  # 2 voxels at 3 mm
        (1, (3.0, 1.0, 1.0), 2, 2.0),  # the same shift along a 1 mm axis
        (2, (1.0, 0.5, 2.5), 1, 2.5),
    ],
)
def test_hd95_of_shifted_cube_with_anisotropic_spacing(axis, spacing, shift, expected_hd95):
    # The faces of A opposite the shift are `shift` voxels from B's face at the same in-plane position
    # and no surface voxel is farther, and those faces are far more than 5% of all surface voxels.
    lo, hi = [2, 2, 2], [8, 8, 8]
    a = cube((14, 14, 14), lo, hi)
    lo[axis] += shift
    hi[axis] += shift
    b = cube((14, 14, 14), lo, hi)
    assert compute_case_metrics(a, b, [1], spacing)[1]["hd95"] == pytest.approx(expected_hd95)


def test_asd_of_shifted_slab_is_mean_of_both_layers():
    # Slabs two voxels thick: every voxel is a surface voxel. Shift 2 along axis 0 at 3 mm: A's layer
    # next to B is 3 mm away, its far layer 6 mm -> ASD = (3 + 6) / 2 = 4.5 in both directions.
    a = cube((6, 10, 10), (1, 2, 2), (3, 8, 8))
    b = cube((6, 10, 10), (3, 2, 2), (5, 8, 8))
    m = compute_case_metrics(a, b, [1], (3.0, 1.0, 1.0))[1]
    assert m["dice"] == 0.0
    assert m["asd"] == pytest.approx(4.5)
    assert m["hd95"] == pytest.approx(6.0)


def _brute_force_assd(a, b, spacing):
    """Independent check: surface = voxels with a face neighbour outside; brute-force nearest distances."""

    def surface(m):
        m = np.pad(m.astype(bool), 1)
        inner = m.copy()
        for ax in range(m.ndim):
            inner &= np.roll(m, 1, ax) & np.roll(m, -1, ax)
        return np.argwhere((m & ~inner)[1:-1, 1:-1, 1:-1]) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return (d.min(1).mean() + d.min(0).mean()) / 2


def test_asd_of_shifted_cube_matches_brute_force():
    a = cube((12, 12, 12), (2, 2, 2), (8, 8, 8))
    b = cube((12, 12, 12), (4, 3, 2), (10, 9, 8))
    spacing = (3.0, 1.0, 0.7)
    m = compute_case_metrics(a, b, [1], spacing)[1]
    assert m["asd"] == pytest.approx(_brute_force_assd(a, b, spacing))


@pytest.mark.parametrize(
    "ref_full, pred_full, expected",
    [
        (
            False,
            False,
            {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0, "both_empty": True, "one_empty": False},
        ),
        (True, False, {"dice": 0.0, "iou": 0.0, "hd95": math.nan, "asd": math.nan, "one_empty": True}),
        (False, True, {"dice": 0.0, "iou": 0.0, "hd95": math.nan, "asd": math.nan, "one_empty": True}),
    ],
)
def test_empty_mask_conventions(ref_full, pred_full, expected):
    c = cube((6, 6, 6), (1, 1, 1), (4, 4, 4))
    z = np.zeros_like(c)
    m = binary_metrics(c if ref_full else z, c if pred_full else z, (2.0, 1.0, 1.0))
    for k, v in expected.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(m[k]), k
        else:
            assert m[k] == v, k


def test_false_positive_components_count_blobs_away_from_the_reference():
    ref = np.zeros((10, 20, 20), bool)
    ref[2:6, 2:8, 2:8] = True
    pred = ref.copy()
    pred[5:8, 7:10, 7:10] = True  # touches the reference: part of a true-positive component
    assert binary_metrics(ref, pred)["fp_components"] == 0
    pred[8, 15, 15] = True  # a single voxel far away
    pred[0, 18:20, 0:3] = True  # a small blob
    pred[9, 0, 19] = pred[8, 1, 18] = True  # diagonal neighbours: one component
    assert binary_metrics(ref, pred)["fp_components"] == 3
    assert binary_metrics(ref, np.zeros_like(ref))["fp_components"] == 0
    assert binary_metrics(np.zeros_like(ref), pred)["fp_components"] == 4


def test_other_label_values_count_as_background():
    ref = np.zeros((4, 4, 4), int)
    pred = np.zeros((4, 4, 4), int)
    ref[0:2] = 1
    pred[0:2] = 1
    pred[2:] = 7  # another task's class: not scored for label 1
    assert compute_case_metrics(ref, pred, [1], 1.0)[1]["dice"] == 1.0


def test_2d_layout_measures_in_plane():
    # nnU-Net stores 2D cases as (1, H, W) with a dummy spacing of 999 along the first axis
    a = cube((1, 10, 10), (0, 2, 2), (1, 6, 6))
    b = cube((1, 10, 10), (0, 4, 2), (1, 8, 6))
    m = compute_case_metrics(a, b, [1], (999.0, 0.5, 0.5))[1]
    assert m["hd95"] == pytest.approx(1.0)  # 2 pixels at 0.5 mm
    assert m["dice"] == 0.5


def test_ill_spacing_length():
    with pytest.raises(ValueError, match="Spacing"):
        compute_case_metrics(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), [1], (1.0, 1.0))


def test_aggregate_leaves_nan_distances_out_and_counts_them():
    a = cube((8, 8, 8), (1, 1, 1), (5, 5, 5))
    b = cube((8, 8, 8), (2, 1, 1), (6, 5, 5))
    z = np.zeros_like(a)
    cases = [
        {"x": binary_metrics(a, a), "y": binary_metrics(a, b)},
        {"x": binary_metrics(a, z), "y": binary_metrics(z, z)},
    ]
    agg = aggregate(cases)
    x, y = agg["classes"]["x"], agg["classes"]["y"]
    assert x["dice"] == {"mean": 0.5, "std": 0.5, "n": 2}
    assert x["hd95"] == {"mean": 0.0, "std": 0.0, "n": 1}
    assert x["n_one_empty"] == 1 and y["n_both_empty"] == 1
    dice_ab = cases[0]["y"]["dice"]
    assert y["dice"]["mean"] == pytest.approx((dice_ab + 1.0) / 2)
    # mean over classes: per case first (case 2's x distance is NaN -> only y's 0 counts)
    assert agg["mean_over_classes"]["dice"]["mean"] == pytest.approx(((1 + dice_ab) / 2 + (0 + 1) / 2) / 2)
    assert agg["mean_over_classes"]["hd95"]["mean"] == pytest.approx((cases[0]["y"]["hd95"] / 2 + 0.0) / 2)


# ---- a tiny union dataset on disk ------------------------------------------------------------------
SPACING_XYZ = (1.0, 1.0, 2.0)  # SimpleITK order; nnU-Net's (z, y, x) spacing is (2, 1, 1)
SHAPE = (8, 12, 12)


def make_table() -> TaskTable:
    return TaskTable(
        tasks=[
            Task(
                name="CT",
                source_dataset="Dataset901_DemoCT",
                channel_names={"0": "CT"},
                labels=[TaskLabel("organ", 1, 1), TaskLabel("tumour", 2, 2)],
                labeled=["CT_0001", "CT_0002"],
                test=["CT_0003"],
            ),
            Task(
                name="MR",
                source_dataset="Dataset902_DemoMR",
                channel_names={"0": "MR"},
                labels=[TaskLabel("heart", 1, 3)],
                labeled=["MR_0001"],
                test=["MR_0002"],
            ),
        ]
    )


def write_seg(path, arr, spacing=SPACING_XYZ):
    img = sitk.GetImageFromArray(np.asarray(arr, dtype=np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def write_image(path, arr, spacing=SPACING_XYZ):
    img = sitk.GetImageFromArray(np.asarray(arr, dtype=np.float32))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def organ():
    return cube(SHAPE, (2, 2, 2), (6, 8, 8))  # 4*6*6 = 144 voxels


def shifted_organ():
    return cube(SHAPE, (2, 4, 2), (6, 10, 8))  # shifted 2 along y (1 mm): overlap 4*4*6 = 96


@pytest.fixture
def union(tmp_path):
    """Union dataset: reference and prediction folders in merged labels, plus per-task source folders."""
    table = make_table()
    raw = tmp_path / "raw"
    ds = raw / "Dataset950_Union"
    ds.mkdir(parents=True)
    (ds / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "noNorm"},
                "labels": table.merged_label_dict(),
                "numTraining": 3,
                "file_ending": ".nii.gz",
                "versemi": table.to_dict(),
            }
        )
    )
    ref, pred, img = tmp_path / "ref", tmp_path / "pred", tmp_path / "images"
    for d in (ref, pred, img):
        d.mkdir()

    # CT_0003: organ (1) perfect, tumour (2) shifted; MR_0002: heart (3) missed entirely,
    # and the prediction holds CT classes, which must not be scored for an MR case.
    r = organ()
    r[3:5, 3:5, 10:12] = 2
    p = organ()
    p[3:5, 5:7, 10:12] = 2
    write_seg(ref / "CT_0003.nii.gz", r)
    write_seg(pred / "CT_0003.nii.gz", p)
    write_seg(ref / "MR_0002.nii.gz", organ() * 3)
    write_seg(pred / "MR_0002.nii.gz", shifted_organ() * 1)
    # CT_0004 (not in the lists: task by prefix): organ shifted, tumour absent in both
    write_seg(ref / "CT_0004.nii.gz", organ())
    write_seg(pred / "CT_0004.nii.gz", shifted_organ())
    for c in ("CT_0003", "MR_0002", "CT_0004"):
        write_image(img / f"{c}_0000.nii.gz", np.random.default_rng(0).normal(size=SHAPE))
    return {"table": table, "raw": raw, "ds": ds, "ref": ref, "pred": pred, "images": img, "tmp": tmp_path}


def test_union_cases_scored_on_their_own_task(union):
    res = evaluate_folders(union["ref"], union["pred"], union["table"])
    assert res["label_space"] == "merged"
    ct3, mr2, ct4 = (res["cases"][c]["metrics"] for c in ("CT_0003", "MR_0002", "CT_0004"))
    assert set(ct3) == {"organ", "tumour"} and set(mr2) == {"heart"}
    assert ct3["organ"]["dice"] == 1.0 and ct3["organ"]["hd95"] == 0.0
    assert ct3["tumour"]["dice"] == 0.0 and ct3["tumour"]["hd95"] == pytest.approx(2.0)
    assert mr2["heart"]["label"] == 3 and mr2["heart"]["dice"] == 0.0 and math.isnan(mr2["heart"]["hd95"])
    assert ct4["organ"]["dice"] == pytest.approx(2 * 96 / (144 + 144))
    assert ct4["organ"]["hd95"] == pytest.approx(2.0)
    assert ct4["tumour"]["both_empty"]
    assert res["cases"]["CT_0003"]["spacing"] == [2.0, 1.0, 1.0]

    ct = res["tasks"]["CT"]
    assert ct["n_cases"] == 2
    assert ct["classes"]["organ"]["label"] == 1
    assert ct["classes"]["organ"]["dice"]["mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert ct["classes"]["tumour"]["dice"]["mean"] == pytest.approx(0.5)  # 0 and 1 (both empty)
    mr = res["tasks"]["MR"]
    assert mr["classes"]["heart"]["n_one_empty"] == 1 and mr["classes"]["heart"]["hd95"]["n"] == 0
    assert res["overall"]["n_tasks"] == 2
    assert res["overall"]["dice"] == pytest.approx((ct["mean_over_classes"]["dice"]["mean"] + 0.0) / 2)


def test_task_option_uses_source_values(union):
    src_ref, src_pred = union["tmp"] / "mr_ref", union["tmp"] / "mr_pred"
    src_ref.mkdir()
    src_pred.mkdir()
    # source case names need not carry the task prefix; heart has source value 1 (merged 3)
    write_seg(src_ref / "heart_01.nii.gz", organ())
    write_seg(src_pred / "heart_01.nii.gz", shifted_organ())
    res = evaluate_folders(src_ref, src_pred, union["table"], task="MR")
    heart = res["cases"]["heart_01"]["metrics"]["heart"]
    assert res["label_space"] == "source" and heart["label"] == 1
    assert heart["dice"] == pytest.approx(2 / 3)
    assert res["tasks"]["MR"]["classes"]["heart"]["label"] == 1
    assert list(res["tasks"]) == ["MR"]


def test_main_writes_json_csv_markdown(union, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(union["raw"]))
    # console scripts run sys.exit(main()): anything but None returned would be exit code 1
    assert main(["-ref", str(union["ref"]), "-pred", str(union["pred"]), "-d", "950", "-np", "1", "-q"]) is None
    out = union["pred"] / "evaluation"

    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == CSV_COLUMNS
    assert [(r["case"], r["class"]) for r in rows] == [
        ("CT_0003", "organ"),
        ("CT_0003", "tumour"),
        ("CT_0004", "organ"),
        ("CT_0004", "tumour"),
        ("MR_0002", "heart"),
    ]
    heart = rows[-1]
    assert heart["task"] == "MR" and heart["label"] == "3" and heart["dice"] == "0.0" and heart["hd95"] == ""

    js = json.loads((out / "metrics.json").read_text())  # strict JSON: NaN written as null
    assert js["cases"]["MR_0002"]["metrics"]["heart"]["hd95"] is None
    assert js["tasks"]["CT"]["classes"]["organ"]["dice"]["n"] == 2
    assert js["extra_predictions"] == []

    md = (out / "summary.md").read_text()
    assert "| task | class | n | Dice | IoU | HD95 (mm) | ASD (mm) | one empty |" in md
    assert "| CT | organ (1) | 2 | 0.833 ± 0.167 |" in md
    assert "| MR | heart (3) | 1 | 0.000 ± 0.000 | 0.000 ± 0.000 | n/a | n/a | 1 |" in md
    assert "| CT | *mean over classes* | 2 |" in md
    assert not (out / "overlays").exists()


def test_overlays_with_and_without_images(union):
    out = union["tmp"] / "eval_img"
    evaluate_folders(
        union["ref"], union["pred"], union["table"], output_dir=out, png=1, images_dir=union["images"]
    )
    pngs = sorted(p.name for p in (out / "overlays").iterdir())
    assert pngs == ["CT_0003.png", "MR_0002.png"]  # first case of each task
    assert all((out / "overlays" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)

    out2 = union["tmp"] / "eval_noimg"
    evaluate_folders(union["ref"], union["pred"], union["table"], output_dir=out2, png=3)
    pngs2 = sorted((out2 / "overlays").iterdir())
    assert [p.name for p in pngs2] == ["CT_0003.png", "CT_0004.png", "MR_0002.png"]
    assert all(p.stat().st_size > 1000 for p in pngs2)


@pytest.mark.parametrize(
    "ref_slices, pred_slices, values, expected",
    [
        # 2 FP voxels in slice 3, where the reference is empty; 1 FN voxel in slice 0: slice 3 is the worst
        ({0: [(1, 1), (1, 2)]}, {0: [(1, 1)], 3: [(2, 2), (2, 3)]}, [1], (3, 2)),
        # the wrong class counts as an error (organ predicted as lesion), other tasks' values (7) do not
        ({1: [(0, 0), (0, 1), (0, 2)]}, {1: [(0, 0)], 2: [(0, 0)]}, [1, 2], (1, 2)),
        ({}, {}, [1], (0, 0)),
    ],
)
def test_error_slice_counts_false_positives_and_negatives(ref_slices, pred_slices, values, expected):
    from nnunetv2_versemi.evaluation.overlays import error_slice

    ref, pred = np.zeros((5, 4, 4), np.uint8), np.zeros((5, 4, 4), np.uint8)
    pred[4] = 7  # another task's class everywhere in the last slice: never an error of this task
    for arr, slices in ((ref, ref_slices), (pred, pred_slices)):
        for z, voxels in slices.items():
            for y, x in voxels:
                arr[z, y, x] = 1
    if values == [1, 2]:  # the second row: the predicted organ voxels (0, 1), (0, 2) became lesion
        pred[1, 0, 1:3] = 2
    assert error_slice(ref, pred, values) == expected


def test_overlay_shows_the_slice_with_the_most_errors(tmp_path):
    """Scattered false positives in a slice without the target appear in the overlay's second row."""
    from nnunetv2_versemi.evaluation.overlays import render_case_overlay

    ref = np.zeros((6, 12, 12), np.uint8)
    ref[1:3, 3:9, 3:9] = 1  # most reference foreground: slice 1 (first of the equal slices)
    pred = ref.copy()
    pred[5, 0:2, 0:6] = 1  # 12 false positives in slice 5, no reference there
    write_seg(tmp_path / "ref.nii.gz", ref)
    write_seg(tmp_path / "pred.nii.gz", pred)
    out = tmp_path / "o.png"
    shown = render_case_overlay(out, str(tmp_path / "ref.nii.gz"), str(tmp_path / "pred.nii.gz"), [("organ", 1)])
    assert shown == [1, 5]
    assert out.read_bytes()[:4] == b"\x89PNG"
    # a perfect prediction: one row, the reference-foreground slice
    assert render_case_overlay(out, str(tmp_path / "ref.nii.gz"), str(tmp_path / "ref.nii.gz"), [("organ", 1)]) == [1]


def test_overlay_legend_says_the_outline_is_the_reference(monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    from nnunetv2_versemi.evaluation import overlays

    legends = []
    real = Figure.legend

    def spy(self, *args, **kwargs):
        legends.append([h.get_label() for h in kwargs["handles"]])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "legend", spy)
    ref = np.zeros((4, 4), np.uint8)
    ref[1:3, 1:3] = 1
    overlays.render_slice_overlay(tmp_path / "a.png", ref, ref, [("organ", 1)], dice={"organ": 1.0})
    assert legends == [["organ (1) Dice 1.000", "outline: reference"]]


def test_overlay_panel_titles_do_not_run_into_each_other(monkeypatch, tmp_path):
    """The longest row title the case overlay writes stays inside its own panel's half of the figure."""
    from matplotlib.figure import Figure

    from nnunetv2_versemi.evaluation import overlays

    saved = []
    real = Figure.savefig

    def spy(self, *args, **kwargs):
        saved.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    ref = np.zeros((40, 40), np.uint8)
    ref[10:30, 10:30] = 1
    title = "slice 106, most reference foreground and most errors (1234 voxels)"
    overlays.render_slice_overlay(tmp_path / "a.png", [ref, ref], [ref, ref], [("organ", 1)],
                                  row_titles=[title, "slice 107, most errors (1234 voxels FP + FN)"])
    fig = saved[0]
    renderer = fig.canvas.get_renderer()
    for left, right in zip(fig.axes[0::2], fig.axes[1::2]):
        a, b = left.title.get_window_extent(renderer), right.title.get_window_extent(renderer)
        assert a.x1 < b.x0, (left.title.get_text(), right.title.get_text())
        assert a.x0 >= 0 and b.x1 <= fig.bbox.width


def test_worker_processes_give_same_numbers(union):
    serial = evaluate_folders(union["ref"], union["pred"], union["table"], num_processes=1)
    parallel = evaluate_folders(union["ref"], union["pred"], union["table"], num_processes=2)
    assert json.dumps(serial["tasks"]) == json.dumps(parallel["tasks"])


def test_extra_prediction_is_reported_not_scored(union):
    write_seg(union["pred"] / "CT_0099.nii.gz", organ())
    res = evaluate_folders(union["ref"], union["pred"], union["table"])
    assert res["extra_predictions"] == ["CT_0099"] and "CT_0099" not in res["cases"]


def test_find_task_table_from_dataset_json_and_model_folder(union):
    assert find_task_table(path=union["ds"] / "dataset.json").same_structure(union["table"])
    model = union["tmp"] / "model"
    model.mkdir()
    (model / "dataset.json").write_text(json.dumps({"labels": {}, "file_ending": ".nii.gz"}))
    (model / "plans.json").write_text(json.dumps({"plans_name": "p", "versemi": union["table"].to_dict()}))
    assert find_task_table(str(model)).same_structure(union["table"])


# ---- bad input -------------------------------------------------------------------------------------
def test_ill_missing_prediction_names_case(union):
    (union["pred"] / "CT_0004.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="CT_0004"):
        evaluate_folders(union["ref"], union["pred"], union["table"])


def test_ill_shape_mismatch_names_files(union):
    write_seg(union["pred"] / "CT_0004.nii.gz", np.zeros((8, 12, 10)))
    with pytest.raises(EvaluationError, match=r"CT_0004.*shape"):
        evaluate_folders(union["ref"], union["pred"], union["table"])


def test_ill_spacing_mismatch_names_files(union):
    write_seg(union["pred"] / "MR_0002.nii.gz", organ(), spacing=(1.0, 1.0, 3.0))
    with pytest.raises(EvaluationError, match=r"MR_0002.*spacing"):
        evaluate_folders(union["ref"], union["pred"], union["table"], num_processes=1)


def test_ill_unknown_task_lists_valid_ones(union):
    with pytest.raises(TaskTableError, match="Valid tasks: CT, MR"):
        evaluate_folders(union["ref"], union["pred"], union["table"], task="Liver")


def test_ill_case_of_no_task(union):
    write_seg(union["ref"] / "Liver_0001.nii.gz", organ())
    write_seg(union["pred"] / "Liver_0001.nii.gz", organ())
    with pytest.raises(EvaluationError, match="Liver_0001"):
        evaluate_folders(union["ref"], union["pred"], union["table"])


def test_ill_dataset_without_task_table(tmp_path):
    f = tmp_path / "dataset.json"
    f.write_text(json.dumps({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}))
    with pytest.raises(TaskTableError, match="no 'versemi' task table"):
        find_task_table(path=f)


def test_ill_cli_errors_before_writing(union, capsys):
    (union["pred"] / "CT_0003.nii.gz").unlink()
    argv = ["-ref", str(union["ref"]), "-pred", str(union["pred"]), "--dataset-json", str(union["ds"])]
    with pytest.raises(SystemExit) as e:
        main([*argv, "-q"])
    assert e.value.code == 2
    assert "CT_0003" in capsys.readouterr().err
    assert not (union["pred"] / "evaluation").exists()
    with pytest.raises(SystemExit):
        main([*argv, "--task", "Nope", "-q"])
    assert "Valid tasks: CT, MR" in capsys.readouterr().err


def test_ill_missing_overlay_image(union):
    (union["images"] / "MR_0002_0000.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="MR_0002"):
        evaluate_folders(
            union["ref"],
            union["pred"],
            union["table"],
            output_dir=union["tmp"] / "o",
            png=1,
            images_dir=union["images"],
        )
    assert not (union["tmp"] / "o").exists()


def test_ill_merged_files_evaluated_with_task_are_refused(union):
    """Merged-valued MR files (heart = 3) scored with --task MR (source heart = 1): an empty prediction would
    score Dice 1 on a reference that holds no source label. Refused, naming the file, nothing written."""
    ref, pred = union["tmp"] / "merged_ref", union["tmp"] / "empty_pred"
    ref.mkdir()
    pred.mkdir()
    write_seg(ref / "MR_0002.nii.gz", organ() * 3)
    write_seg(pred / "MR_0002.nii.gz", np.zeros(SHAPE))
    out = union["tmp"] / "never"
    with pytest.raises(EvaluationError, match=r"reference .*MR_0002.nii.gz holds value\(s\) \[3\].*evaluated "
                                              r"without --task"):
        evaluate_folders(ref, pred, union["table"], task="MR", output_dir=out)
    assert not out.exists()


def test_ill_source_files_evaluated_without_task_are_refused(union):
    ref, pred = union["tmp"] / "source_ref", union["tmp"] / "source_pred"
    ref.mkdir()
    pred.mkdir()
    write_seg(ref / "MR_0002.nii.gz", organ())  # source heart = 1 is CT's organ in the merged space
    write_seg(pred / "MR_0002.nii.gz", organ())
    with pytest.raises(EvaluationError, match=r"no merged label of task MR.*need --task NAME"):
        evaluate_folders(ref, pred, union["table"])


def test_ill_prediction_outside_the_label_space_is_refused(union):
    write_seg(union["pred"] / "CT_0004.nii.gz", organ() * 7)  # the union has merged labels 0-3
    with pytest.raises(EvaluationError, match=r"prediction .*CT_0004.nii.gz holds value\(s\) \[7\]"):
        evaluate_folders(union["ref"], union["pred"], union["table"])
