"""Benchmark command (tiny budget, every report file, resume), speed module, plans presets."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from nnunetv2_versemi.benchmark import methods as B
from nnunetv2_versemi.benchmark import report, speed
from nnunetv2_versemi.benchmark.preparation import prepare_benchmark, union_budget
from nnunetv2_versemi.data import merge as M
from nnunetv2_versemi.data.demo_data import generate_demo_datasets
from nnunetv2_versemi.entrypoints.benchmark import benchmark_main, build_benchmark_parser, speed_main
from nnunetv2_versemi.entrypoints.data import plan_and_preprocess_main
from nnunetv2_versemi.plans_presets import (
    PRESET_DIR,
    PlansPresetError,
    apply_overlay,
    apply_to_plans_file,
    list_presets,
    load_overlay,
)

import _synth as S  # tests/ is on sys.path (pyproject.toml: pytest's pythonpath)

REPO = Path(__file__).resolve().parents[2]
UNION = 950
TINY = [
    "--epochs",
    "1",
    "--iterations",
    "2",
    "--val-iterations",
    "1",
    "-device",
    "cpu",
    "--npp",
    "1",
    "--skip-val",
]
METHOD_KEYS = ["alone", "union", "noUnsup", "versemi", "pseudo"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Demo tasks (3 labeled, 2 unlabeled, 1 test case each, half resolution) merged, planned (2d), and the
    benchmark run once with a 1-epoch x 2-iteration budget."""
    base = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    S.isolated_nnunet(base, mp)
    raw = base / "nnUNet_raw"
    generate_demo_datasets(raw, num_labeled=3, num_unlabeled=2, num_test=1, scale=0.5)
    M.merge_datasets([901, 902, 903], UNION, num_processes=1, progress=False)
    plan_and_preprocess_main(["-d", str(UNION), "-c", "2d", "-np", "1", "-npfp", "1", "--no_pbar"])
    # no data-augmentation workers (set after the union's planning: nnU-Net's planner cannot take 0; the
    # benchmark's own planning of the per-task datasets works around that)
    mp.setenv("nnUNet_n_proc_DA", "0")
    out = base / "report"
    benchmark_main(["-d", str(UNION), "-c", "2d", *TINY, "-o", str(out)])
    yield {"base": base, "out": out, "raw": raw}
    mp.undo()


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def test_report_files_rows_and_columns(bench):
    out = bench["out"]
    for name in (
        "results.json",
        "results.csv",
        "summary.csv",
        "report.md",
        "dice_boxplot.png",
        "learning_curves.png",
        "benchmark.log",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    tasks = ["DemoCT", "DemoMR", "DemoMC"]
    assert results["tasks"] == tasks
    assert [m["key"] for m in results["methods"]] == METHOD_KEYS
    assert results["budget"] == {"epochs": 1, "iterations": 2, "val_iterations": 1}

    header, rows = _csv(out / "results.csv")
    assert header == report.CASE_COLUMNS
    # every method scored every test case (one per task), in the same merged label space
    assert sorted((r["method"], r["task"]) for r in rows) == sorted(
        (m, t) for m in METHOD_KEYS for t in tasks
    )
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)

    header, rows = _csv(out / "summary.csv")
    assert header == report.SUMMARY_COLUMNS
    assert sorted((r["method"], r["task"]) for r in rows) == sorted(
        (m, t) for m in METHOD_KEYS for t in [*tasks, report.MEAN_ROW]
    )
    assert all(float(r["dice_minus_baseline"]) == 0.0 for r in rows if r["method"] == "alone")
    for r in rows:
        if r["task"] != report.MEAN_ROW:
            assert r["n"] == "1" and r["dice_mean"] != ""

    md = (out / "report.md").read_text()
    for label in [m.label for m in B.METHODS if m.key in METHOD_KEYS] + tasks + [report.MEAN_ROW]:
        assert label in md
    # learning curves: one point per epoch for every run (2 x 3 per-task runs + 3 union runs)
    assert len(results["curves"]) == 9
    for run, curves in results["curves"].items():
        assert len(curves["0"]["train_loss"]) == 1 and len(curves["0"]["pseudo_dice"]) == 1
        # union models: pseudo Dice per task (from nnU-Net's per-class values); per-task models have none
        per_task = curves["0"].get("pseudo_dice_per_task")
        if run in ("union", "noUnsup", "versemi"):
            assert sorted(per_task) == sorted(tasks)
            assert all(len(v) == 1 and (v[0] is None or 0.0 <= v[0] <= 1.0) for v in per_task.values())
        else:
            assert per_task is None, run


def test_runs_are_real_nnunet_model_folders(bench):
    results = json.loads((bench["out"] / "results.json").read_text())
    by_run = {r["run"]: r for r in results["runs"]}
    assert sorted(by_run) == ["alone-DemoCT", "alone-DemoMC", "alone-DemoMR", "noUnsup", "pseudo-DemoCT",
                              "pseudo-DemoMC", "pseudo-DemoMR", "union", "versemi"]
    expected = {
        "alone": "nnUNetTrainer",
        "pseudo": "nnUNetTrainer",
        "union": "nnUNetTrainer",
        "noUnsup": "VerSemiTrainer_noUnsup",
        "versemi": "VerSemiTrainer",
    }
    plans = B.bench_plans_identifier("nnUNetPlans", B.Budget(1, 2, 1))
    for r in by_run.values():
        folder = Path(r["model_folder"])
        assert folder.name == f"{expected[r['method']]}__{plans}__2d"
        ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        # the class name nnU-Net's predictors look up: a discoverable trainer, not a budget variant
        assert ckpt["trainer_name"] == expected[r["method"]]
        assert ckpt["current_epoch"] == 1
    # the per-task baseline datasets hold the task's labeled cases with labels 1..K
    mc = json.loads(
        (Path(os.environ["nnUNet_raw"]) / by_run["alone-DemoMC"]["dataset"] / "dataset.json").read_text()
    )
    assert mc["labels"] == {"background": 0, "DemoMC_organ": 1, "DemoMC_lesion": 2}
    assert mc["channel_names"] == {"0": "noNorm"}


def test_resume_skips_finished_runs(bench, capsys):
    out = bench["out"]
    watched = sorted(Path(os.environ["nnUNet_results"]).rglob("checkpoint_final.pth"))
    watched += sorted((out / B.PRED_DIR).rglob("*.nii.gz"))
    assert len(watched) == 9 + 5 * 3
    before = {p: p.stat().st_mtime_ns for p in watched}
    capsys.readouterr()
    benchmark_main(["-d", str(UNION), "-c", "2d", *TINY, "-o", str(out)])
    log = capsys.readouterr().out
    assert log.count("Skipping ") == 9 and "Training " not in log and "Pseudo-labeling" not in log
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    results = json.loads((out / "results.json").read_text())
    assert all(r["skipped_on_last_invocation"] for r in results["runs"])


def test_bad_input_fails_before_training(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark_main(["-d", str(UNION), "-c", "2d", *TINY, "--methods", "a", "x", "-o", str(tmp_path / "r")])
    with pytest.raises(SystemExit):
        benchmark_main(["-d", str(UNION), "-c", "3d_lowres", *TINY, "-o", str(tmp_path / "r")])
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_missing_unlabeled_files_refused_for_a_variant_too(bench, tmp_path, capsys):
    """An interrupted preprocessing leaves unlabeled cases without files: every method that trains on them is
    refused before training, the VerSemi variants as well as (d)."""
    pp = next((bench["base"] / "nnUNet_preprocessed").glob(f"Dataset{UNION}_*"))
    one = sorted((pp / "nnUNetPlans_2d_unlabeled").glob("*.b2nd"))[0]
    hidden = one.with_suffix(".hidden")
    one.rename(hidden)
    try:
        with pytest.raises(SystemExit) as e:
            benchmark_main(["-d", str(UNION), "-c", "2d", *TINY, "--methods", "VerSemiTrainer_noSpec",
                            "-o", str(tmp_path / "r")])
        assert e.value.code == 2
        assert "1 unlabeled case(s)" in capsys.readouterr().err
        assert not (tmp_path / "r" / "results.json").exists()
    finally:
        hidden.rename(one)


def test_pseudo_label_method_trains_on_labeled_plus_a_predictions(bench, tmp_path, capsys):
    """(e): each task's dataset holds its labeled cases with their true labels plus its unlabeled images
    labeled by (a)'s model (exactly what that model predicts), in the task's classes; validation folds stay
    on true labels; e without a is refused before anything is written."""
    import SimpleITK as sitk
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_versemi.nnunet_paths import dataset_name, raw_folder
    from nnunetv2_versemi.tasktable import find_task_table

    with pytest.raises(SystemExit):
        benchmark_main(["-d", str(UNION), "-c", "2d", *TINY, "--methods", "e", "-o", str(tmp_path / "r")])
    assert "add a to --methods" in capsys.readouterr().err and not (tmp_path / "r").exists()

    results = json.loads((bench["out"] / "results.json").read_text())
    by_run = {r["run"]: r for r in results["runs"]}
    table = find_task_table(UNION)
    raw = Path(os.environ["nnUNet_raw"])
    mc = table.tasks[table.index("DemoMC")]
    folder = raw / by_run["pseudo-DemoMC"]["dataset"]
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == len(mc.labeled) + len(mc.unlabeled) == 5
    assert meta["versemi_task_of"]["made_by"]["model_folder"] == by_run["alone-DemoMC"]["model_folder"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == sorted(
        c + ".nii.gz" for c in [*mc.labeled, *mc.unlabeled])
    splits = json.loads((folder / "splits_final.json").read_text())
    assert all(set(mc.unlabeled) <= set(s["train"]) and not set(mc.unlabeled) & set(s["val"]) for s in splits)
    # the pseudo labels are (a)'s predictions of the unlabeled images, in DemoMC's classes 0..2
    pred = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cpu"),
                           perform_everything_on_device=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(by_run["alone-DemoMC"]["model_folder"], [0], "checkpoint_final.pth")
    case = mc.unlabeled[0]
    expected = pred.predict_single_npy_array(
        *_read_image(Path(raw_folder(dataset_name(UNION))) / "imagesUnlabeled" / f"{case}_0000.nii.gz"))
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz")))
    assert got.max() <= 2 and (got == expected).mean() > 0.999


def _read_image(path: Path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return SimpleITKIO().read_images([str(path)])


def test_present_class_dice_method_is_a_per_task_nnunet_run(bench, tmp_path):
    """(f): nnUNetTrainer_presentClassDice on the same per-task datasets as (a), reported beside it."""
    out = tmp_path / "f"
    benchmark_main(["-d", str(UNION), "-c", "2d", *TINY, "--methods", "a", "f", "-o", str(out)])
    results = json.loads((out / "results.json").read_text())
    by_run = {r["run"]: r for r in results["runs"]}
    assert sorted(by_run) == ["alone-DemoCT", "alone-DemoMC", "alone-DemoMR", "alonePCD-DemoCT",
                              "alonePCD-DemoMC", "alonePCD-DemoMR"]
    for t in ("DemoCT", "DemoMR", "DemoMC"):
        assert by_run[f"alonePCD-{t}"]["dataset"] == by_run[f"alone-{t}"]["dataset"]
        ckpt = torch.load(Path(by_run[f"alonePCD-{t}"]["model_folder"]) / "fold_0" / "checkpoint_final.pth",
                          map_location="cpu", weights_only=False)
        assert ckpt["trainer_name"] == "nnUNetTrainer_presentClassDice"
    header, rows = _csv(out / "summary.csv")
    assert {r["method"] for r in rows} == {"alone", "alonePCD"}


def test_budget_per_task_scales_only_the_union_runs(bench):
    args = build_benchmark_parser().parse_args(["-d", str(UNION), "-c", "2d", *TINY, "--budget-per", "task"])
    ctx = prepare_benchmark(args)
    budget, plans = union_budget(ctx)
    assert budget == B.Budget(1, 2 * 3, 1) and ctx.budget == B.Budget(1, 2, 1)
    # another budget, another plans identifier: finished runs of the per-model budget are not reused
    assert plans != ctx.bench_plans == B.bench_plans_identifier("nnUNetPlans", B.Budget(1, 2, 1))


def test_seeds_remerge_sources_and_aggregate(bench, capsys):
    from nnunetv2_versemi.benchmark import seeds as SD

    out = bench["base"] / "seeds_report"
    args = ["-d", str(UNION), "-c", "2d", *TINY, "--methods", "a", "c", "--seeds", "2", "-o", str(out)]
    benchmark_main(args)
    agg = json.loads((out / SD.SEEDS_JSON).read_text())
    assert agg["seeds"] == 2 and agg["unions"][0].startswith(f"Dataset{UNION}_")
    seed1 = agg["unions"][1]
    assert seed1.endswith("S1")
    dj = json.loads((Path(os.environ["nnUNet_raw"]) / seed1 / "dataset.json").read_text())
    assert dj[SD.SEED_MARK]["merge_seed"] == dj["versemi_merge"]["seed"] == 12345 + 1
    # the test cases come from the sources' imagesTs: the same in every seed, so differences pair up
    assert agg["test_cases"][0] == agg["test_cases"][1]
    tasks = agg["tasks"]
    for key in ("alone", "noUnsup"):
        for t in [*tasks, report.MEAN_ROW]:
            s = agg["dice_over_seeds"][key][t]
            assert s["n"] == 2 and len(s["values"]) == 2
    ci = agg["paired_difference_to_baseline"]["noUnsup"]
    assert ci[report.MEAN_ROW]["n"] == 2 * sum(len(c) for c in agg["test_cases"][0].values())
    assert "alone" not in agg["paired_difference_to_baseline"]
    assert {c["seed"] for c in agg["curves"]["noUnsup"]} == {0, 1}
    md = (out / SD.SEEDS_MD).read_text()
    assert "mean ± std over seeds" in md and "95 % CI" in md
    assert (out / SD.SEEDS_CURVES_PNG).stat().st_size > 0
    assert (out / "seed1" / "report.md").is_file()
    # a second invocation reuses the seed unions and every finished run
    capsys.readouterr()
    benchmark_main(args)
    log = capsys.readouterr().out
    assert "Training " not in log and "merging" not in log and log.count("Skipping ") == 2 * 4


def test_seed_aggregate_numbers():
    from nnunetv2_versemi.benchmark import seeds as SD

    methods = [{"key": "alone", "letter": "a", "label": "(a)"}, {"key": "versemi", "letter": "d", "label": "(d)"}]

    def result(a_dice, d_dice):
        cases = [{"method": m, "task": "T", "case": f"c{i}", "dice": v}
                 for m, vals in (("alone", a_dice), ("versemi", d_dice)) for i, v in enumerate(vals)]
        summary = {m: {t: {"dice": {"mean": sum(v) / len(v)}} for t in ("T", report.MEAN_ROW)}
                   for m, v in (("alone", a_dice), ("versemi", d_dice))}
        return {"methods": methods, "tasks": ["T"], "cases": cases, "summary": summary, "runs": [], "curves": {},
                "configuration": "2d", "budget": {"epochs": 1, "iterations": 2, "val_iterations": 1}, "budget_per": "task", "folds": ["all"], "machine": {},
                "test_cases": {"T": ["c0", "c1"]}}

    agg = SD.aggregate([result([0.5, 0.7], [0.6, 0.9]), result([0.4, 0.6], [0.0, 0.0])], ["D1", "D2"])
    d = agg["dice_over_seeds"]["versemi"]["T"]
    assert d["values"] == pytest.approx([0.75, 0.0]) and d["std"] == pytest.approx((0.75**2 / 2) ** 0.5)
    ci = agg["paired_difference_to_baseline"]["versemi"]["T"]
    diffs = [0.1, 0.2, -0.4, -0.6]
    mean = sum(diffs) / 4
    sd = (sum((x - mean) ** 2 for x in diffs) / 3) ** 0.5
    assert ci["n"] == 4 and ci["mean"] == pytest.approx(mean)
    assert ci["high"] - ci["mean"] == pytest.approx(3.182446 * sd / 2, rel=1e-5)  # t(0.975, 3)
    assert agg["collapsed"] == [{"method": "versemi", "task": "T", "seed": 1}]
    # every ordered pair of methods: here only (d) - (a), the same numbers as the difference to the baseline
    assert [(p["method"], p["reference"]) for p in agg["paired_differences"]] == [("versemi", "alone")]
    assert agg["paired_differences"][0]["difference"]["T"] == ci
    assert "| (d) - (a) | -17.5 [" in SD.seeds_markdown(agg)
    assert SD.t_interval([0.3])["low"] is None and SD.t_interval([])["n"] == 0


def test_ablation_trainers_are_benchmark_methods():
    from nnunetv2_versemi.discovery import ensure_ext_trainer_env

    ensure_ext_trainer_env()
    m = B.method_by_name("VerSemiTrainer_noUnsup_dynamicHead")
    assert m.trainer == m.key == "VerSemiTrainer_noUnsup_dynamicHead" and m.prompted and not m.per_task
    assert not B.method_by_name("nnUNetTrainer_5epochs").prompted
    # which methods read the unlabeled images (their preprocessed files are checked before training)
    assert B.method_by_name("VerSemiTrainer_noSpec").unlabeled and B.method_by_name("d").unlabeled
    assert not B.method_by_name("c").unlabeled and not B.method_by_name("VerSemiTrainer_supOnly").unlabeled
    for bad in ("NoSuchTrainer", "../x"):
        with pytest.raises(B.BenchmarkError, match="Unknown method"):
            B.method_by_name(bad)


# ---- plans presets ------------------------------------------------------------------------------------
def test_shipped_presets_match_repository_copies():
    assert {"paper_96", "cpu_demo"} <= set(list_presets())
    for name in list_presets():
        assert json.loads((REPO / "plans" / f"{name}.json").read_text()) == json.loads(
            (PRESET_DIR / f"{name}.json").read_text()
        ), f"plans/{name}.json and nnunetv2_versemi/plans_presets/{name}.json differ"


def _plans() -> dict:
    plans, _ = speed.synthetic_plans((32, 64, 64), 2)
    return plans


def test_overlay_inherits_and_merges_nested_keys():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = _plans()
    overlay = {
        "configurations": {
            "3d_small": {
                "inherits_from": "3d_fullres",
                "batch_size": 1,
                "architecture": {"arch_kwargs": {"features_per_stage": [8, 16, 32, 64, 128]}},
            }
        }
    }
    new = apply_overlay(plans, overlay)
    assert "3d_small" not in plans["configurations"]  # the input is not modified
    cm = PlansManager(new).get_configuration("3d_small")
    assert cm.batch_size == 1 and list(cm.patch_size) == [32, 64, 64]
    assert list(cm.network_arch_init_kwargs["features_per_stage"]) == [8, 16, 32, 64, 128]
    # everything else of the parent's architecture is kept (nnU-Net's topology for 32x64x64: pooling 3x in z and
    # 4x in-plane, 5 stages), and its data are reused
    assert cm.network_arch_init_kwargs["n_stages"] == 5
    assert [list(s) for s in cm.network_arch_init_kwargs["strides"]][-1] == [1, 2, 2]
    assert cm.data_identifier == "nnUNetPlans_3d_fullres"


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"inherits_from": "3d_fullres", "patch_size": [30, 64, 64]}, "not divisible"),
        ({"inherits_from": "3d_fullres", "batch_size": 0}, "batch_size"),
        ({"inherits_from": "2d", "batch_size": 2}, "inherits from '2d'"),
        (
            {"inherits_from": "3d_fullres", "architecture": {"arch_kwargs": {"features_per_stage": [8, 16]}}},
            "5 stages",
        ),
    ],
)
def test_ill_overlays(entry, message):
    with pytest.raises(PlansPresetError, match=message):
        apply_overlay(_plans(), {"configurations": {"x": entry}})


def test_ill_overlay_structure(tmp_path):
    with pytest.raises(PlansPresetError, match="top-level"):
        apply_overlay(_plans(), {"configurations": {}, "patch_size": [1]})
    with pytest.raises(PlansPresetError, match="No plans preset"):
        load_overlay("no_such_preset")


def test_paper_preset_on_plans_file(tmp_path):
    plans = _plans()
    plans["configurations"]["3d_fullres"]["patch_size"] = [64, 64, 64]
    f = tmp_path / "nnUNetPlans.json"
    f.write_text(json.dumps(plans))
    written, names = apply_to_plans_file(f, "paper_96", "nnUNetPlans_paper96")
    new = json.loads(Path(written).read_text())
    assert Path(written).name == "nnUNetPlans_paper96.json" and new["plans_name"] == "nnUNetPlans_paper96"
    assert names == ["3d_fullres_paper96"]
    assert new["configurations"]["3d_fullres_paper96"] == {
        "inherits_from": "3d_fullres",
        "patch_size": [96, 96, 96],
        "batch_size": 2,
    }
    assert json.loads(f.read_text()) == plans  # the source plans are left alone


def _real_geometry_plans(with_3d: bool = True) -> dict:
    """Plans like nnU-Net makes for CT: a 3d network of total stride 4x64x64 (16x32x32 does not divide), and
    a 2d configuration."""
    import copy

    plans = _plans()
    c3 = plans["configurations"]["3d_fullres"]
    arch = c3["architecture"]["arch_kwargs"]
    arch.update(n_stages=4, strides=[[1, 1, 1], [1, 4, 4], [2, 4, 4], [2, 4, 4]],
                features_per_stage=arch["features_per_stage"][:4], kernel_sizes=arch["kernel_sizes"][:4],
                n_conv_per_stage=arch["n_conv_per_stage"][:4],
                n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"][:3])
    c2 = copy.deepcopy(c3)
    c2["patch_size"] = [64, 64]
    c2["data_identifier"] = "nnUNetPlans_2d"
    c2["architecture"]["arch_kwargs"].update(strides=[[1, 1], [2, 2], [2, 2], [2, 2]], kernel_sizes=[[3, 3]] * 4)
    plans["configurations"]["2d"] = c2
    if not with_3d:
        del plans["configurations"]["3d_fullres"]
    return plans


def test_cpu_preset_fits_real_geometry(tmp_path, capsys):
    """cpu_demo on plans whose 3d stride does not divide its 16x32x32 patch: the patch is rounded up per axis to
    the stride (16x64x64), and the 2d part is applied as well."""
    new = apply_overlay(_real_geometry_plans(), load_overlay("cpu_demo"))
    assert new["configurations"]["3d_fullres_cpu"]["patch_size"] == [16, 64, 64]
    assert "fit_patch_to_network" not in new["configurations"]["3d_fullres_cpu"]
    assert new["configurations"]["2d_cpu"] == {"inherits_from": "2d", "batch_size": 4}
    # the shipped demo geometry keeps its 16x32x32 (already divisible)
    assert apply_overlay(_plans(), load_overlay("cpu_demo"), [])["configurations"]["3d_fullres_cpu"][
        "patch_size"] == [16, 32, 32]


def test_preset_applies_what_fits_and_names_what_it_skipped(tmp_path, capsys):
    f = tmp_path / "nnUNetPlans.json"
    f.write_text(json.dumps(_real_geometry_plans(with_3d=False)))  # 2d data: no 3d_fullres planned
    from nnunetv2_versemi.entrypoints.presets import presets_main

    presets_main(["--plans-file", str(f), "--preset", "cpu_demo"])
    out = capsys.readouterr().out
    assert "configuration(s) 2d_cpu" in out and "Skipped 3d_fullres_cpu: " in out and "'3d_fullres'" in out
    assert set(json.loads(f.read_text())["configurations"]) == {"2d", "2d_cpu"}
    # nothing fits: an error, the file untouched
    before = f.read_text()
    with pytest.raises(PlansPresetError, match="no configuration of the preset fits"):
        apply_to_plans_file(f, "paper_96", skipped=[])
    assert f.read_text() == before
    # strict callers (no skipped list) still get the first misfit
    with pytest.raises(PlansPresetError, match="inherits from '3d_fullres'"):
        apply_overlay(json.loads(before), load_overlay("cpu_demo"))


def test_cpu_preset_on_benchmark_union(bench):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pp = Path(os.environ["nnUNet_preprocessed"]) / "Dataset950_VerSemiUnion" / "nnUNetPlans.json"
    new = apply_overlay(json.loads(pp.read_text()), load_overlay("cpu_demo"))
    cm = PlansManager(new).get_configuration("2d_cpu")
    assert cm.batch_size == 4 and cm.data_identifier == "nnUNetPlans_2d"


# ---- speed ----------------------------------------------------------------------------------------------
def test_per_prompt_reference_matches_one_pass_network():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_versemi.training.trainer import VerSemiTrainer

    plans, c = speed.synthetic_plans((32, 32), 2)
    table = speed.fake_table(3)
    plans["versemi"] = table.to_dict()
    pm = PlansManager(plans)
    net = VerSemiTrainer.build_network_architecture(pm, pm.get_configuration(c), 1, 4, True).eval()
    ref = speed.PerPromptNetwork(net)
    x = torch.randn(5, 1, 32, 32)
    groups = [torch.tensor([[0], [2]]), torch.tensor([[3, 0, 1]]), torch.tensor([[0, 1, 2, 3]] * 2)]
    with torch.no_grad():
        one = net(x, groups)
        per = ref(x, groups)
    for g1, g2 in zip(one, per):
        for a, b in zip(g1, g2):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_speed_ratios_are_computed_and_positive(tmp_path, capsys):
    argv = ["-device", "cpu", "--patch", "16", "16", "--batch-size", "2", "--main-tasks", "2", "--scale-tasks", "2",
            "3", "--ref-tasks", "2", "--warmup", "1", "--steps", "1", "--slices", "1", "--pred-repeats", "1",
            "--no-memory", "--trainers", "VerSemiTrainer_paperTerms"]
    argv += ["-o", str(tmp_path)]
    speed_main(argv)
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["command"] == " ".join(["nnUNetv2_versemi_benchmark", "speed", *argv])
    assert "| ratio | value |" in capsys.readouterr().out
    assert set(result["training"]) == {"nnunet", "versemi@2", "versemi@3", "per_prompt@2",
                                       "VerSemiTrainer_paperTerms@2"}
    assert len(result["ratios"]) == 6 and "VerSemiTrainer_paperTerms@2 / nnunet (step time)" in result["ratios"]
    assert all(v is not None and v > 0 for v in result["ratios"].values()), result["ratios"]
    assert "| ratio | value |" in speed.markdown(result)
    with pytest.raises(speed.SpeedError, match="not a VerSemi trainer"):
        speed.versemi_trainer_class("nnUNetTrainer")


def test_speed_times_the_step_with_every_term_not_the_closing_phase():
    from nnunetv2_versemi.benchmark.speed_inputs import scratch_nnunet_env
    from nnunetv2_versemi.benchmark.speed_measure import _prepare
    from nnunetv2_versemi.discovery import ensure_ext_trainer_env

    ensure_ext_trainer_env()
    plans, c = speed.synthetic_plans((32, 32), 2)
    for trainer_name in ("VerSemiTrainer", "VerSemiTrainer_noSupFinish"):
        contender = speed.Contender("versemi@2", "versemi", 2, trainer_name)
        with scratch_nnunet_env():
            trainer, _ = _prepare(contender, plans, c, speed._table_factory(None), 1, torch.device("cpu"))
        assert trainer.unlabeled_weight() > 0
        # the default's last 40 % of the epochs train L_sup alone: a step there has no CutMix term to time
        assert not trainer.schedule.in_sup_finish(trainer.current_epoch, trainer.num_epochs), trainer_name
        closing = trainer.schedule.sup_finish_epochs(trainer.num_epochs)
        assert trainer.current_epoch == trainer.num_epochs - 1 - closing
    assert closing == 0  # the last trainer has no closing phase: its last epoch is timed


def test_memory_probe_sees_the_step():
    from nnunetv2_versemi.discovery import ensure_ext_trainer_env

    ensure_ext_trainer_env()
    plans, c = speed.synthetic_plans((32, 32), 2)
    res = speed.memory_probe((speed.Contender("versemi@2", "versemi", 2), plans, c, None, 1, 1, 1))
    assert res["peak_mib"] > 0
