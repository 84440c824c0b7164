"""``nnUNetv2_versemi_demo``: the whole VerSemi pipeline on built-in demo data, end to end, on CPU.

generate three synthetic tasks -> merge them (half of the labels kept, the rest unlabeled) -> plan and
preprocess (2d) -> train VerSemiTrainer_demo -> predict every task's held-out test images with its own
prompt (source label values) -> evaluate per task. Everything lives in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from os.path import join

from nnunetv2_versemi.discovery import ensure_ext_trainer_env
from nnunetv2_versemi.entrypoints.common import add_device

UNION_ID = 950
UNION = f"Dataset{UNION_ID}_VerSemiUnion"
TASKS = {"DemoCT": "Dataset901_DemoCT", "DemoMR": "Dataset902_DemoMR", "DemoMC": "Dataset903_DemoMC"}


def _step(title: str, cmd: list[str], env: dict) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True)
    print(f"--- {title}: {time.time() - t0:.0f} s", flush=True)


def demo_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nnUNetv2_versemi_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo_workdir", help="folder for raw, preprocessed and results data")
    p.add_argument("-tr", default="VerSemiTrainer_demo", help="trainer (default: VerSemiTrainer_demo, 8x20 steps)")
    add_device(p, default="cpu")
    p.add_argument("--labeled-fraction", type=float, default=0.5, help="labels kept per task (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing workdir")
    a = p.parse_args(argv)
    work = os.path.abspath(a.workdir)
    if os.path.exists(join(work, "raw", UNION)) and not a.overwrite:
        p.exit(2, f"nnUNetv2_versemi_demo: error: {work} already holds a demo run; use --overwrite or another "
                  "--workdir\n")
    if a.overwrite and os.path.isdir(work):
        import shutil

        shutil.rmtree(work)
    env = dict(os.environ, nnUNet_raw=join(work, "raw"), nnUNet_preprocessed=join(work, "preprocessed"),
               nnUNet_results=join(work, "results"))
    env.setdefault("nnUNet_n_proc_DA", "2")
    env["nnUNet_extTrainer"] = ensure_ext_trainer_env()
    t0 = time.time()
    _step("1/6 demo data", ["nnUNetv2_versemi_demo_data"], env)
    _step("2/6 merge", ["nnUNetv2_versemi_merge", "-d", *TASKS.values(), "-o", str(UNION_ID),
                        "--labeled-fraction", str(a.labeled_fraction), "-np", "2"], env)
    _step("3/6 plan and preprocess", ["nnUNetv2_versemi_plan_and_preprocess", "-d", str(UNION_ID), "-c", "2d",
                                      "-np", "2", "-npfp", "2"], env)
    _step("4/6 train", ["nnUNetv2_train", str(UNION_ID), "2d", "0", "-tr", a.tr, "-device", a.device], env)
    summary = {}
    for task, source in TASKS.items():
        pred = join(work, "predictions", task)
        _step(f"5/6 predict {task}", ["nnUNetv2_versemi_predict", "-i", join(work, "raw", source, "imagesTs"),
                                      "-o", pred, "-d", str(UNION_ID), "-c", "2d", "-f", "0", "-tr", a.tr,
                                      "--task", task, "-device", a.device, "-npp", "1", "-nps", "1"], env)
        ev = join(work, "evaluation", task)
        _step(f"6/6 evaluate {task}", ["nnUNetv2_versemi_evaluate", "-ref", join(work, "raw", source, "labelsTs"),
                                       "-pred", pred, "-d", str(UNION_ID), "--task", task, "-o", ev, "-np", "1",
                                       "--images", join(work, "raw", source, "imagesTs"), "--png", "2"], env)
        with open(join(ev, "metrics.json")) as f:
            summary[task] = json.load(f)["tasks"][task]
    print(f"\nDemo finished in {(time.time() - t0) / 60:.1f} min. Test-set results per task "
          f"(evaluation/<task>/summary.md, overlays in evaluation/<task>/overlays):")
    for task, agg in summary.items():
        m = {k: agg["mean_over_classes"][k]["mean"] for k in ("dice", "hd95")}
        hd = "n/a" if m["hd95"] is None else f"{m['hd95']:.2f} mm"
        print(f"  {task:8s} Dice {m['dice']:.3f}  HD95 {hd}")
    print(f"Model: {join(work, 'results', UNION)}")

