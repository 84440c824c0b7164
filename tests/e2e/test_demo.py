"""The README demo: its plans preset, its summary, and the whole command as a user runs it (``--quick``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nnunetv2_versemi.entrypoints.demo import MODES, check_summary, summary_markdown
from nnunetv2_versemi.plans_presets import apply_overlay, load_overlay


def test_demo_preset_narrows_the_planned_2d_network():
    from e2e.test_benchmark import _real_geometry_plans  # tests/ is on sys.path (pytest's pythonpath)

    plans = _real_geometry_plans(with_3d=False)
    new = apply_overlay(plans, load_overlay("demo"))
    c = new["configurations"]["2d_demo"]
    assert c["inherits_from"] == "2d" and c["batch_size"] == 4
    assert c["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128]
    # the rest of the parent's network is kept
    assert c["architecture"]["arch_kwargs"]["strides"] == plans["configurations"]["2d"]["architecture"][
        "arch_kwargs"]["strides"]


def _mode(dice: float, cases: dict[str, float], lesion: float | None = None) -> dict:
    classes = {"organ": {"dice": dice, "hd95": 1.5}}
    if lesion is not None:
        classes["lesion"] = {"dice": lesion, "hd95": 2.0}
    return {"dice": dice, "hd95": 1.5, "classes": classes,
            "cases": {c: {"dice": d, "hd95": None if d == 0 else 1.0} for c, d in cases.items()}}


def _summary() -> dict:
    return {
        "mode": "full", "minutes": 7.25, "trainer": "VerSemiTrainer_demoConverged",
        "tasks": {
            "DemoCT": {"prompted": _mode(0.95, {"DemoCT_a": 0.96, "DemoCT_b": 0.94}),
                       "auto": _mode(0.95, {"DemoCT_a": 0.96, "DemoCT_b": 0.94}),
                       "stock": _mode(0.92, {"DemoCT_a": 0.90, "DemoCT_b": 0.94}),
                       "recognised": {"DemoCT_a": "DemoCT", "DemoCT_b": "DemoCT"}, "overlay": "/w/ct.png"},
            "DemoMC": {"prompted": _mode(0.90, {"DemoMC_a": 0.9}, lesion=0.86),
                       "auto": _mode(0.0, {"DemoMC_a": 0.0}, lesion=0.0),
                       "stock": _mode(0.90, {"DemoMC_a": 0.9}, lesion=0.86),
                       "recognised": {"DemoMC_a": "DemoCT"}, "overlay": "/w/mc.png"},
        },
        "step_seconds": {"train": 300.4},
        "paths": {"model": "/w/results/checkpoint_final.pth"},
    }


def test_summary_has_a_table_per_task_with_every_mode_case_and_class():
    text = summary_markdown(_summary())
    assert "# nnUNetv2_versemi_demo: 7.2 min (full run)" in text
    assert "| case | recognised as (auto) | prompted | auto | stock |" in text
    assert "| DemoCT_b | DemoCT | 0.940 / 1.0 | 0.940 / 1.0 | 0.940 / 1.0 |" in text
    assert "| **mean** | 2 of 2 right | **0.950 / 1.5** | **0.950 / 1.5** | **0.920 / 1.5** |" in text
    # a misrecognised case is marked, an empty prediction has no HD95, a second class gets its own row
    assert "| DemoMC_a | DemoCT (WRONG) | 0.900 / 1.0 | 0.000 / n/a | 0.900 / 1.0 |" in text
    assert "| mean, lesion | | 0.860 / 2.0 | 0.000 / 2.0 | 0.860 / 2.0 |" in text
    assert "| mean, organ |" in text and text.count("| mean, ") == 2  # only the two-class task
    assert "Overlay: `/w/ct.png`" in text and "Overlay: `/w/mc.png`" in text
    assert "- model: `/w/results/checkpoint_final.pth`" in text
    assert all(cmd in text for cmd in MODES.values())


def test_summary_warns_about_misrecognised_cases_and_routing_losses():
    warnings = check_summary(_summary())
    assert warnings == [
        "DemoCT: stock Dice 0.920 is more than 0.02 below prompted 0.950",
        "DemoMC: case(s) DemoMC_a recognised as another task",
        "DemoMC: auto Dice 0.000 is more than 0.02 below prompted 0.900",
    ]
    assert check_summary(_summary(), tolerance=0.05)[0].startswith("DemoMC: case(s)")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo") / "wd"
    env = dict(os.environ, nnUNet_n_proc_DA="1", nnUNet_compile="false")
    res = subprocess.run([sys.executable, "-c", "from nnunetv2_versemi.entrypoints.demo import demo_main; "
                          "demo_main()", "--quick", "--workdir", str(work)],
                         env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise AssertionError(f"demo --quick failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return work, res.stdout


def test_quick_demo_runs_the_user_commands_and_summarises_every_task(quick_demo):
    work, stdout = quick_demo
    # the commands a user runs, each printed before it runs
    for cmd in ("$ nnUNetv2_versemi_plans_preset -d 950 --preset demo", "$ nnUNetv2_train 950 2d_demo 0",
                "--task auto", "$ nnUNetv2_predict -i"):
        assert cmd in stdout
    summary = json.loads((work / "summary.json").read_text())
    assert summary["mode"] == "quick" and set(summary["tasks"]) == {"DemoCT", "DemoMR", "DemoMC"}
    for task, t in summary["tasks"].items():
        cases = set(t["prompted"]["cases"])
        assert len(cases) == 1 and all(c.startswith(task + "_") for c in cases)
        for m in MODES:  # every mode scored the same test cases
            assert set(t[m]["cases"]) == cases
            assert 0 <= t[m]["dice"] <= 1
        assert set(t["recognised"]) == cases and set(t["recognised"].values()) <= {"DemoCT", "DemoMR", "DemoMC"}
        assert t["overlay"].endswith(".png") and open(t["overlay"], "rb").read(4) == b"\x89PNG"
    assert set(summary["tasks"]["DemoMC"]["stock"]["classes"]) == {"organ", "lesion"}
    # one --task auto folder for all tasks, one stock folder with the union's merged labels
    auto = work / "predictions" / "auto"
    assert len(json.loads((auto / "recognised_tasks.json").read_text())) == 3
    assert len([f for f in os.listdir(work / "predictions" / "stock") if f.endswith(".nii.gz")]) == 3
    assert os.path.isfile(summary["paths"]["model"])
    assert (work / "summary.md").read_text().strip() in stdout


def test_quick_demo_refuses_an_existing_workdir(quick_demo):
    work, _ = quick_demo
    res = subprocess.run([sys.executable, "-c", "from nnunetv2_versemi.entrypoints.demo import demo_main; "
                          "demo_main()", "--quick", "--workdir", str(work)], capture_output=True, text=True)
    assert res.returncode == 2 and "already holds a demo run" in res.stderr
