"""``nnUNetv2_versemi_benchmark add-task`` at a tiny budget: the three unions, the fine-tuning from the
warm-start weights, the report and its resume."""

from __future__ import annotations

import json

import pytest

from nnunetv2_versemi.benchmark.add_task_bench import finetune_epochs, summarise, task_curves
from nnunetv2_versemi.data.demo_data import generate_demo_datasets
from nnunetv2_versemi.entrypoints.benchmark import benchmark_main

import _synth as S  # tests/ is on sys.path (pyproject.toml: pytest's pythonpath)

ARGS = ["--datasets", "901", "902", "903", "--first-id", "610", "--seeds", "2", "-c", "2d", "--epochs", "2",
        "--iterations", "2", "--val-iterations", "1", "--finetune-fraction", "0.5", "-device", "cpu",
        "--disable_tta"]


@pytest.fixture(scope="module")
def added(tmp_path_factory):
    base = tmp_path_factory.mktemp("addbench")
    mp = pytest.MonkeyPatch()
    S.isolated_nnunet(base, mp)
    generate_demo_datasets(base / "nnUNet_raw", num_labeled=3, num_unlabeled=2, num_test=1, scale=0.5)
    mp.setenv("nnUNet_n_proc_DA", "0")
    out = base / "report"
    benchmark_main(["add-task", *ARGS, "-o", str(out)])
    yield {"base": base, "out": out}
    mp.undo()


def test_unions_models_and_report(added):
    base, out = added["base"], added["out"]
    result = json.loads((out / "add_task.json").read_text())
    raw = base / "nnUNet_raw"
    # before: the other tasks; after: grown by the new one (old prompt numbers first); scratch: all from scratch
    seed = result["seeds"][0]
    assert seed["unions"] == {"before": "Dataset610_VSAdd0Old", "after": "Dataset611_VSAdd0Grown",
                              "scratch": "Dataset612_VSAdd0All"}
    # seed 1's unions follow seed 0's, and no per-task dataset of seed 0 took one of their ids
    assert result["seeds"][1]["unions"] == {"before": "Dataset613_VSAdd1Old", "after": "Dataset614_VSAdd1Grown",
                                            "scratch": "Dataset615_VSAdd1All"}
    alone_ids = {int(d.name[7:10]) for d in raw.iterdir() if "_VSBench" in d.name}
    assert len(alone_ids) == 6 and not alone_ids & set(range(610, 616))
    for union, tasks in ((seed["unions"]["before"], ["DemoCT", "DemoMR"]),
                         (seed["unions"]["after"], ["DemoCT", "DemoMR", "DemoMC"]),
                         (seed["unions"]["scratch"], ["DemoCT", "DemoMR", "DemoMC"])):
        dj = json.loads((raw / union / "dataset.json").read_text())
        assert [t["name"] for t in dj["versemi"]["tasks"]] == tasks
    assert result["summary"]["new_task"] == "DemoMC"
    # the budget: 2 epochs x 2 iterations per task; fine-tuning half the epochs of the 3-task union
    assert seed["steps"] == {"before": 2 * 2 * 2, "after": 1 * 2 * 3, "scratch": 2 * 2 * 3}
    assert seed["train_seconds"]["after"] > 0 and seed["train_seconds"]["alone"] > 0
    # every method scored the same test cases of each task it knows
    cases = {m: {(t, c) for t, c, _ in v} for m, v in seed["cases"].items()}
    assert cases["after"] == cases["scratch"] and cases["alone"] == cases["scratch"]
    assert cases["before"] == {k for k in cases["after"] if k[0] != "DemoMC"} and len(cases["after"]) == 3
    # the fine-tuned model started from the warm-start weights of the model before
    ft = json.loads((out / "seed0" / "after" / "finetune.json").read_text())
    assert ft["warm_start"].endswith("__fold_all.pth") and "Dataset611_VSAdd0Grown" in ft["warm_start"]
    assert ft["budget"] == "e1-i6-v1"
    names = {a["aim"] for a in result["summary"]["aims"]}
    assert any("per-task nnU-Net" in n for n in names) and any("DemoCT (old)" in n for n in names)
    assert result["summary"]["recognised_cases"]["total"] == 2 * 3  # 3 test cases per seed
    assert (out / "add_task.md").read_text().startswith("# Adding DemoMC")
    assert (out / "add_task_curves.png").stat().st_size > 1000
    # the fine-tuning's per-task curves come from its training log (one epoch)
    assert set(seed["curves"]["after"]) == {"DemoCT", "DemoMR", "DemoMC"}
    assert seed["curves"]["after"]["DemoMC"]["steps"] == [6]


def test_rerun_trains_nothing(added, capsys):
    out = added["out"]
    before = (out / "add_task.json").read_text()
    benchmark_main(["add-task", *ARGS, "-o", str(out)])
    text = capsys.readouterr().out
    assert "Training" not in text and "fine-tuning" in text
    assert json.loads((out / "add_task.json").read_text())["seeds"][0]["steps"] == json.loads(before)["seeds"][0]["steps"]


def test_another_finetune_trainer_fine_tunes_the_same_models(added, capsys):
    """--finetune-tr: only the fine-tuning (and its scoring) runs again, with that trainer's learning rate, beside
    the default's results."""
    out, results = added["out"], added["base"] / "nnUNet_results"
    trained = {p: p.stat().st_mtime for p in results.glob("*/*/fold_*/checkpoint_final.pth")}
    args = [*ARGS[:6], "--seeds", "1", *ARGS[8:], "--finetune-tr", "VerSemiTrainer_lr1en3", "-o", str(out)]
    benchmark_main(["add-task", *args])
    assert "with VerSemiTrainer_lr1en3" in capsys.readouterr().out
    new = {p for p in results.glob("*/*/fold_*/checkpoint_final.pth") if p not in trained}
    assert len(new) == 1, new  # the fine-tuning only: nothing before adding, from scratch or per task again
    (ckpt,) = new
    assert ckpt.parts[-4] == "Dataset611_VSAdd0Grown" and ckpt.parts[-3].startswith("VerSemiTrainer_lr1en3__")
    assert all(p.stat().st_mtime == t for p, t in trained.items())
    result = json.loads((out / "add_task_VerSemiTrainer_lr1en3.json").read_text())
    default = json.loads((out / "add_task.json").read_text())
    assert result["finetune_trainer"] == "VerSemiTrainer_lr1en3" and default["finetune_trainer"] == "VerSemiTrainer"
    seed, seed_default = result["seeds"][0], default["seeds"][0]
    # the same models before adding, from scratch and per task; a fine-tuning of its own
    for m in ("before", "scratch", "alone"):
        assert seed["cases"][m] == seed_default["cases"][m], m
    ft = json.loads((out / "seed0" / "after_VerSemiTrainer_lr1en3" / "finetune.json").read_text())
    assert ft["budget"] == "e1-i6-v1" and "Dataset611_VSAdd0Grown" in ft["warm_start"]
    logs = list((added["base"] / "nnUNet_results" / "Dataset611_VSAdd0Grown").glob(
        "VerSemiTrainer_lr1en3__*/fold_all/training_log_*.txt"))
    assert logs and "Current learning rate: 0.001" in logs[0].read_text()
    assert (out / "seed0" / "recognition_VerSemiTrainer_lr1en3" / "recognition.json").is_file()
    assert "VerSemiTrainer_lr1en3" in (out / "add_task_VerSemiTrainer_lr1en3.md").read_text()


def test_taken_dataset_id_is_refused_before_anything_runs(added, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark_main(["add-task", *ARGS[:4], "--first-id", "609", *ARGS[6:], "-o", str(added["out"] / "x")])
    assert e.value.code == 2
    assert "Dataset id 610 is taken by Dataset610_VSAdd0Old" in capsys.readouterr().err


def test_finetune_epochs_and_curve_parsing(tmp_path):
    assert finetune_epochs(20, 0.25) == 5 and finetune_epochs(2, 0.25) == 1 and finetune_epochs(30, 0.1) == 3
    fold = tmp_path / "fold_all"
    fold.mkdir()
    (fold / "training_log_1.txt").write_text(
        "x: Pseudo dice per task {'A': np.float64(nan), 'B': np.float64(0.5)}\n"
        "y: Pseudo dice per task {'A': np.float64(0.25), 'B': 0.75}\n")
    assert task_curves(str(tmp_path), 10) == {"A": {"steps": [10, 20], "dice": [None, 0.25]},
                                              "B": {"steps": [10, 20], "dice": [0.5, 0.75]}}


def test_summary_aims_from_planted_numbers():
    def seed(s, after_new, alone_new, after_old, before_old):
        return {"seed": s, "tasks": ["Old", "New"], "new_task": "New",
                "cases": {"before": {("Old", "o1"): before_old, ("Old", "o2"): before_old},
                          "after": {("Old", "o1"): after_old, ("Old", "o2"): after_old, ("New", "n1"): after_new},
                          "scratch": {("Old", "o1"): 0.9, ("Old", "o2"): 0.9, ("New", "n1"): after_new + 0.05},
                          "alone": {("Old", "o1"): 0.8, ("Old", "o2"): 0.8, ("New", "n1"): alone_new}},
                "steps": {"before": 100, "after": 37, "scratch": 150},
                "recognition": {"Old": {"cases": 1.0, "n_cases": 2}, "New": {"cases": 0.0, "n_cases": 1}}}

    s = summarise([seed(0, 0.8, 0.7, 0.9, 0.95), seed(1, 0.8, 0.7, 0.9, 0.95)], 0.25)
    aims = {a["aim"]: a for a in s["aims"]}
    assert aims["new task >= per-task nnU-Net - 1"]["met"]  # +10 points
    assert not aims["new task >= from-scratch union - 1"]["met"]  # -5 points
    assert not aims["Old (old) within 1 point of the model before adding"]["met"]  # -5 points: forgotten
    assert aims["Old (old) within 1 point of the model before adding"]["value"] == pytest.approx(-0.05)
    assert not aims["stock routing recognises >= 99 % of test cases (old and new tasks)"]["met"]  # 4 of 6
    assert aims["fine-tuning compute <= 25 % of the from-scratch union's (steps)"]["met"]  # 37 / 150
    assert s["recognised_cases"] == {"right": 4, "total": 6}
    assert s["dice"]["after"]["New"] == pytest.approx(0.8)


def test_curves_plot_ignores_the_poster_style_nnunet_left_on(tmp_path, monkeypatch):
    """nnU-Net's progress plots switch seaborn's poster style on for the whole process (font scale 2.5): the
    curves of the benchmark, drawn after training in the same process, must still use matplotlib's defaults."""
    import matplotlib
    import seaborn as sns
    from matplotlib.figure import Figure

    from nnunetv2_versemi.benchmark.add_task_bench import curves_plot

    sizes = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: sizes.append(fig.axes[0].xaxis.label.get_fontsize()))
    with matplotlib.style.context("default"):  # whatever style earlier tests left on in this process
        expected = matplotlib.font_manager.FontProperties(size=matplotlib.rcParams["axes.labelsize"]).get_size_in_points()
    with matplotlib.rc_context():
        sns.set(font_scale=2.5)  # what nnU-Net's logger does
        curves_plot({"summary": {"new_task": "C"},
                     "seeds": [{"seed": 0, "curves": {"after": {"C": {"steps": [1, 2], "dice": [0.5, None]}},
                                                      "scratch": {"C": {"steps": [1, 2], "dice": [0.2, 0.4]}}}}]},
                    str(tmp_path / "c.png"))
    assert sizes == [expected]


def _fake_dataset(base, name: str, trainer_dir: str = "nnUNetTrainer__nnUNetPlans__2d") -> None:
    for root in ("nnUNet_raw", "nnUNet_preprocessed"):
        (base / root / name).mkdir(parents=True)
        (base / root / name / "dataset.json").write_text(json.dumps({"name": name, "labels": {"background": 0}}))
    (base / "nnUNet_preprocessed" / name / "nnUNetPlans.json").write_text(json.dumps({"dataset_name": name}))
    model = base / "nnUNet_results" / name / trainer_dir
    (model / "fold_all").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps({"dataset_name": name, "plans_name": "nnUNetPlans"}))
    (model / "fold_all" / "checkpoint_final.pth").write_bytes(b"weights")


def test_more_seeds_move_per_task_datasets_off_the_new_union_ids(tmp_path, monkeypatch, capsys):
    """A run of 2 seeds put per-task datasets on the ids after its unions (616 = seed 2's first union id of a run
    at --first-id 610). Rerun with --seeds 3: they move to free ids with their models, the rest is refused."""
    from nnunetv2_versemi.benchmark.add_task_bench import claim_union_ids
    from nnunetv2_versemi.benchmark.methods import BenchmarkError
    from nnunetv2_versemi.entrypoints.benchmark import build_add_task_parser

    S.isolated_nnunet(tmp_path, monkeypatch)
    _fake_dataset(tmp_path, "Dataset610_VSAdd0Old")
    _fake_dataset(tmp_path, "Dataset616_VSBench612_DemoCT")
    _fake_dataset(tmp_path, "Dataset617_VSBench612_DemoMR")
    _fake_dataset(tmp_path, "Dataset619_VSBench615_DemoCT")  # seed 1's per-task dataset, on no union id
    args = build_add_task_parser().parse_args([*ARGS[:6], "--seeds", "3", *ARGS[8:], "-o", str(tmp_path / "r")])
    claim_union_ids(args)
    raw = sorted(d.name for d in (tmp_path / "nnUNet_raw").iterdir())
    assert raw == ["Dataset610_VSAdd0Old", "Dataset619_VSBench615_DemoCT", "Dataset620_VSBench612_DemoCT",
                   "Dataset621_VSBench612_DemoMR"]
    assert "moved per-task dataset Dataset616_VSBench612_DemoCT to Dataset620_VSBench612_DemoCT" in capsys.readouterr().out
    for root in ("nnUNet_preprocessed", "nnUNet_results"):
        assert not (tmp_path / root / "Dataset616_VSBench612_DemoCT").exists()
    pp = tmp_path / "nnUNet_preprocessed" / "Dataset620_VSBench612_DemoCT"
    assert json.loads((pp / "dataset.json").read_text())["name"] == "Dataset620_VSBench612_DemoCT"
    assert json.loads((pp / "nnUNetPlans.json").read_text())["dataset_name"] == "Dataset620_VSBench612_DemoCT"
    model = tmp_path / "nnUNet_results" / "Dataset620_VSBench612_DemoCT" / "nnUNetTrainer__nnUNetPlans__2d"
    assert json.loads((model / "plans.json").read_text())["dataset_name"] == "Dataset620_VSBench612_DemoCT"
    assert (model / "fold_all" / "checkpoint_final.pth").read_bytes() == b"weights"
    # a dataset that is not this run's stays where it is, and the run is refused
    _fake_dataset(tmp_path, "Dataset618_Other")
    with pytest.raises(BenchmarkError, match="Dataset id 618 is taken by Dataset618_Other"):
        claim_union_ids(args)
    assert (tmp_path / "nnUNet_raw" / "Dataset618_Other").is_dir()
