"""``nnUNetv2_versemi_demo``: the whole VerSemi pipeline on built-in demo data, end to end, on CPU.

generate three synthetic tasks -> merge them (half of the labels kept, the rest unlabeled) -> plan and
preprocess (2d) -> add the ``demo`` plans preset (``2d_demo``: batch 4, a narrow network) -> train
VerSemiTrainer_demoConverged -> predict the held-out test images of every task the ways a user does:
``nnUNetv2_versemi_predict --task NAME`` (prompted, per task), ``nnUNetv2_versemi_predict --task auto`` (all
tasks' images in one folder, each case's task recognised) and stock ``nnUNetv2_predict`` on the union's
imagesTs -> evaluate each per task (Dice, HD95, one overlay PNG per task) -> print a summary, also written
to ``summary.md`` and ``summary.json``. Everything lives in ``--workdir``. ``--quick``: fewer cases and 160
steps, a smoke run of the same path (the tests use it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import time
from os.path import join

from nnunetv2_versemi.discovery import ensure_ext_trainer_env
from nnunetv2_versemi.entrypoints.common import add_device

UNION_ID = 950
UNION = f"Dataset{UNION_ID}_VerSemiUnion"
TASKS = {"DemoCT": "Dataset901_DemoCT", "DemoMR": "Dataset902_DemoMR", "DemoMC": "Dataset903_DemoMC"}
CONFIGURATION = "2d_demo"  # added by the plans preset "demo"
PRESET = "demo"
FOLD = "0"
# (labeled, unlabeled, test) cases per demo task, and the trainer, of a full and of a --quick run
FULL = {"counts": (8, 8, 4), "trainer": "VerSemiTrainer_demoConverged"}
QUICK = {"counts": (4, 2, 1), "trainer": "VerSemiTrainer_demo"}
MODES = {
    "prompted": "nnUNetv2_versemi_predict --task NAME",
    "auto": "nnUNetv2_versemi_predict --task auto",
    "stock": "nnUNetv2_predict",
}


def _step(title: str, cmd: list[str], env: dict, times: dict) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True)
    times[title] = time.time() - t0
    print(f"--- {title}: {times[title]:.0f} s", flush=True)


def _test_folders(work: str, table) -> dict:
    """The held-out test cases under the union's case ids (task name + source case id, as the merge names
    them): every task's raw images in one folder (what ``--task auto`` gets), and per task its images and
    labels. Copies, so the workdir stays valid wherever the sources move."""
    folders = {"images": join(work, "test", "images_all_tasks"), "tasks": {}}
    os.makedirs(folders["images"], exist_ok=True)
    for task in table.tasks:
        source = join(work, "raw", task.source_dataset)
        t_img, t_lab = join(work, "test", task.name, "images"), join(work, "test", task.name, "labels")
        os.makedirs(t_img, exist_ok=True)
        os.makedirs(t_lab, exist_ok=True)
        for case in task.test:
            src_case = case[len(task.name) + 1:]
            for c in range(len(task.channel_names)):
                name = f"{src_case}_{c:04d}{task.file_ending}"
                shutil.copy(join(source, "imagesTs", name), join(t_img, f"{case}_{c:04d}{task.file_ending}"))
                shutil.copy(join(source, "imagesTs", name), join(folders["images"], f"{case}_{c:04d}{task.file_ending}"))
            shutil.copy(join(source, "labelsTs", src_case + task.file_ending), join(t_lab, case + task.file_ending))
        folders["tasks"][task.name] = {"images": t_img, "labels": t_lab}
    return folders


def _mean(stats: dict, metric: str) -> float | None:
    v = stats[metric]["mean"]
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _collect(results: dict, task: str) -> dict:
    """One task's numbers from an ``evaluate_folders`` result: per case and mean over cases, the mean over the
    task's classes and each class (Dice, HD95)."""
    agg = results["tasks"][task]
    cases = {}
    for case, r in results["cases"].items():
        if r["task"] != task:
            continue
        per_class = {n: {"dice": m["dice"], "hd95": None if math.isnan(m["hd95"]) else m["hd95"]}
                     for n, m in r["metrics"].items()}
        hds = [c["hd95"] for c in per_class.values() if c["hd95"] is not None]
        cases[case] = {"dice": float(sum(c["dice"] for c in per_class.values()) / len(per_class)),
                       "hd95": float(sum(hds) / len(hds)) if len(hds) == len(per_class) else None,
                       "classes": per_class}
    return {
        "dice": _mean(agg["mean_over_classes"], "dice"),
        "hd95": _mean(agg["mean_over_classes"], "hd95"),
        "classes": {n: {"dice": _mean(c, "dice"), "hd95": _mean(c, "hd95")} for n, c in agg["classes"].items()},
        "cases": cases,
    }


def _fmt(m: dict | None) -> str:
    if m is None:
        return "n/a"
    hd = "n/a" if m["hd95"] is None else f"{m['hd95']:.1f}"
    return f"{m['dice']:.3f} / {hd}"


def summary_markdown(summary: dict) -> str:
    """The demo's closing summary: per task a table of prompted, ``--task auto`` and stock Dice / HD95 per
    test case and mean, the task recognised for each case, each class's mean, and one overlay PNG."""
    lines = [f"# nnUNetv2_versemi_demo: {summary['minutes']:.1f} min ({summary['mode']} run)", "",
             "Test Dice / HD95 (mm), each case's mean over its task's classes. prompted: "
             f"`{MODES['prompted']}`; auto: `{MODES['auto']}` (all tasks' images in one folder); stock: "
             f"`{MODES['stock']}` on the union's imagesTs.", ""]
    for task, t in summary["tasks"].items():
        n_right = sum(r == task for r in t["recognised"].values())
        lines += [f"## {task} ({', '.join(t['prompted']['classes'])})", "",
                  "| case | recognised as (auto) | prompted | auto | stock |", "|---|---|---|---|---|"]
        for case in sorted(t["prompted"]["cases"]):
            rec = t["recognised"].get(case, "n/a")
            lines.append(f"| {case} | {rec}{'' if rec == task else ' (WRONG)'} | "
                         + " | ".join(_fmt(t[m]["cases"].get(case)) for m in MODES) + " |")
        lines.append(f"| **mean** | {n_right} of {len(t['recognised'])} right | "
                     + " | ".join(f"**{_fmt(t[m])}**" for m in MODES) + " |")
        if len(t["prompted"]["classes"]) > 1:
            for cls in t["prompted"]["classes"]:
                lines.append(f"| mean, {cls} | | " + " | ".join(_fmt(t[m]["classes"][cls]) for m in MODES) + " |")
        lines += ["", f"Overlay: `{t['overlay']}`", ""]
    lines += ["## Where things are", ""] + [f"- {k}: `{v}`" for k, v in summary["paths"].items()]
    lines += ["", "Time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["step_seconds"].items()),
              ""]
    return "\n".join(lines)


def check_summary(summary: dict, tolerance: float = 0.02) -> list[str]:
    """Warnings: a test case recognised as another task, or auto / stock Dice more than ``tolerance`` below
    prompted prediction on a task."""
    out = []
    for task, t in summary["tasks"].items():
        wrong = sorted(c for c, r in t["recognised"].items() if r != task)
        if wrong:
            out.append(f"{task}: case(s) {', '.join(wrong)} recognised as another task")
        for m in ("auto", "stock"):
            if t[m]["dice"] is not None and t[m]["dice"] < t["prompted"]["dice"] - tolerance:
                out.append(f"{task}: {m} Dice {t[m]['dice']:.3f} is more than {tolerance} below prompted "
                           f"{t['prompted']['dice']:.3f}")
    return out


def demo_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nnUNetv2_versemi_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo_workdir", help="folder for raw, preprocessed and results data")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['counts'][0]} / {QUICK['counts'][1]} / {QUICK['counts'][2]} labeled / "
                        f"unlabeled / test cases per task and {QUICK['trainer']} (160 steps); the numbers mean "
                        "nothing, the path is the same")
    p.add_argument("-tr", default=None, help=f"trainer (default: {FULL['trainer']}, with --quick {QUICK['trainer']})")
    add_device(p, default="cpu")
    p.add_argument("--labeled-fraction", type=float, default=0.5, help="labels kept per task (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing workdir")
    a = p.parse_args(argv)
    run = QUICK if a.quick else FULL
    trainer = a.tr or run["trainer"]
    work = os.path.abspath(a.workdir)
    if os.path.exists(join(work, "raw", UNION)) and not a.overwrite:
        p.exit(2, f"nnUNetv2_versemi_demo: error: {work} already holds a demo run; use --overwrite or another "
                  "--workdir\n")
    if a.overwrite and os.path.isdir(work):
        shutil.rmtree(work)
    env = dict(os.environ, nnUNet_raw=join(work, "raw"), nnUNet_preprocessed=join(work, "preprocessed"),
               nnUNet_results=join(work, "results"))
    env.setdefault("nnUNet_n_proc_DA", "2")
    # nnU-Net's final validation otherwise starts 8 export workers, too many for the 2-core machine it is meant for
    env.setdefault("nnUNet_def_n_proc", "2")
    env["nnUNet_extTrainer"] = ensure_ext_trainer_env()
    times: dict[str, float] = {}
    t0 = time.time()
    n_lab, n_unl, n_test = run["counts"]
    _step("demo data", ["nnUNetv2_versemi_demo_data", "--num-labeled", str(n_lab), "--num-unlabeled", str(n_unl),
                        "--num-test", str(n_test)], env, times)
    _step("merge", ["nnUNetv2_versemi_merge", "-d", *TASKS.values(), "-o", str(UNION_ID),
                    "--labeled-fraction", str(a.labeled_fraction), "-np", "2"], env, times)
    _step("plan and preprocess", ["nnUNetv2_versemi_plan_and_preprocess", "-d", str(UNION_ID), "-c", "2d",
                                  "-np", "2", "-npfp", "2"], env, times)
    _step("plans preset", ["nnUNetv2_versemi_plans_preset", "-d", str(UNION_ID), "--preset", PRESET], env, times)
    _step("train", ["nnUNetv2_train", str(UNION_ID), CONFIGURATION, FOLD, "-tr", trainer, "-device", a.device],
          env, times)

    from nnunetv2_versemi.evaluation.evaluate import evaluate_folders
    from nnunetv2_versemi.tasktable import find_task_table

    table = find_task_table(path=join(work, "raw", UNION, "dataset.json"))
    test = _test_folders(work, table)
    pred = {m: join(work, "predictions", m) for m in MODES}
    common = ["-d", str(UNION_ID), "-c", CONFIGURATION, "-f", FOLD, "-tr", trainer, "-device", a.device,
              "-npp", "1", "-nps", "1"]
    for task in table.names:
        _step(f"predict {task} (prompted)", ["nnUNetv2_versemi_predict", "-i", test["tasks"][task]["images"],
                                             "-o", pred["prompted"], "--task", task, *common], env, times)
    _step("predict all tasks (--task auto)", ["nnUNetv2_versemi_predict", "-i", test["images"], "-o", pred["auto"],
                                              "--task", "auto", *common], env, times)
    _step("predict all tasks (stock nnUNetv2_predict)", ["nnUNetv2_predict", "-i", join(work, "raw", UNION, "imagesTs"),
                                                         "-o", pred["stock"], *common], env, times)

    t_eval = time.time()
    with open(join(pred["auto"], "recognised_tasks.json")) as f:
        recognised = {case: r["task"] for case, r in json.load(f).items()}
    ev = join(work, "evaluation")
    stock = evaluate_folders(join(work, "raw", UNION, "labelsTs"), pred["stock"], table,
                             output_dir=join(ev, "stock"))
    tasks = {}
    for task in table.names:
        folders = test["tasks"][task]
        per_mode = {}
        for m in ("prompted", "auto"):
            # the auto folder holds every task's cases; those without a reference here are not scored
            res = evaluate_folders(folders["labels"], pred[m], table, task=task, output_dir=join(ev, m, task),
                                   png=1 if m == "auto" else 0, images_dir=folders["images"])
            per_mode[m] = _collect(res, task)
        per_mode["stock"] = _collect(stock, task)
        overlay_dir = join(ev, "auto", task, "overlays")
        tasks[task] = {**per_mode, "recognised": {c: recognised.get(c, "n/a") for c in per_mode["prompted"]["cases"]},
                       "overlay": join(overlay_dir, sorted(os.listdir(overlay_dir))[0])}
    times["evaluate"] = time.time() - t_eval
    model = join(work, "results", UNION, f"{trainer}__nnUNetPlans__{CONFIGURATION}")
    summary = {
        "mode": "quick" if a.quick else "full",
        "minutes": (time.time() - t0) / 60,
        "trainer": trainer,
        "tasks": tasks,
        "step_seconds": times,
        "paths": {
            "model": join(model, f"fold_{FOLD}", "checkpoint_final.pth"),
            "training log and curves": join(model, f"fold_{FOLD}"),
            "predictions": join(work, "predictions") + " (prompted/, auto/ with recognised_tasks.json, stock/)",
            "evaluation": ev + " (metrics.json, metrics.csv, summary.md per mode and task)",
            "test images": join(work, "test"),
            "this summary": join(work, "summary.md") + ", " + join(work, "summary.json"),
        },
    }
    text = summary_markdown(summary)
    warnings = check_summary(summary)
    if warnings:
        text += "\n" + "\n".join(f"WARNING: {w}" for w in warnings) + "\n"
    with open(join(work, "summary.md"), "w") as f:
        f.write(text)
    with open(join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n" + text)
