"""Benchmark report: tables (JSON, CSV, markdown) and figures (Dice box plots, learning curves).

Inputs are the per-method results of :func:`nnunetv2_versemi.evaluation.evaluate.evaluate_folders` (each test
case scored on its own task's classes) and the run states of :mod:`.run`. Per case, a task's classes are
averaged first (as ``evaluate`` does), then mean and population std are taken over the task's test cases.
HD95 is in mm; a case where exactly one of reference and prediction is empty has no HD95 and is left out of
the HD95 mean (its Dice, 0, counts). "Mean over tasks" is the unweighted mean of the per-task means.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import platform
from importlib.metadata import version
from os.path import join

import numpy as np
import torch

from nnunetv2_versemi.tasktable import TABLE_KEY, TaskTable

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
SUMMARY_CSV = "summary.csv"
REPORT_MD = "report.md"
BOXPLOT_PNG = "dice_boxplot.png"
CURVES_PNG = "learning_curves.png"
CASE_COLUMNS = ["method", "method_label", "task", "case", "dice", "hd95", "iou", "asd", "fp_components"]
SUMMARY_COLUMNS = [
    "method",
    "method_label",
    "task",
    "n",
    "dice_mean",
    "dice_std",
    "hd95_mean",
    "hd95_std",
    "fp_components_mean",
    "dice_minus_baseline",
]
MEAN_ROW = "mean over tasks"
#: per task and method in every summary: Dice and HD95 (means over classes), false-positive components (sums)
SUMMARY_METRICS = ("dice", "hd95", "fp_components")


def machine_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["nnunetv2"] = version("nnunetv2")
    except Exception:  # metadata is informative only
        pass
    return info


def nan_to_none(x):
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _case_mean(metrics: dict, key: str) -> float:
    vals = [m[key] for m in metrics.values() if m[key] is not None and not math.isnan(m[key])]
    return float(np.mean(vals)) if vals else math.nan


def _stats(values: list[float]) -> dict:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], float)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def _model_task_table(model_folder: str) -> TaskTable | None:
    """The task table of a union model folder (its plans.json); None for a model of one task (its pseudo Dice is
    the task's)."""
    plans_file = join(model_folder, "plans.json")
    if not os.path.isfile(plans_file):
        return None
    with open(plans_file) as f:
        plans = json.load(f)
    table = TaskTable.from_plans(plans) if TABLE_KEY in plans else None
    return table if table is not None and table.num_tasks > 1 else None


def _per_task_dice(table: TaskTable, per_class: list) -> dict[str, list]:
    """{task: pseudo Dice per epoch} from nnU-Net's per-class pseudo Dice (None where a task had no class seen)."""
    out: dict[str, list] = {t.name: [] for t in table.tasks}
    for epoch in per_class:
        for name, v in table.per_task_mean([float(x) for x in epoch]).items():
            out[name].append(None if math.isnan(v) else v)
    return out


def learning_curves(model_folder: str, folds: list, iterations: int = 1) -> dict:
    """Per fold: train loss, validation loss and pseudo Dice (nnU-Net's ``mean_fg_dice``) per epoch, read from
    the checkpoint's logging (falls back to checkpoint_latest.pth); ``steps`` = optimizer steps at the end of
    each epoch (``iterations`` per epoch); ``switch_step``: where a VerSemi run switched its unlabeled terms on.
    A union model also gets ``pseudo_dice_per_task``: {task: pseudo Dice per epoch} under the task's prompt."""
    out = {}
    table = _model_task_table(model_folder)
    for fold in folds:
        for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
            path = join(model_folder, f"fold_{fold}", name)
            if os.path.isfile(path):
                ckpt = torch.load(path, map_location="cpu", weights_only=False)
                log = ckpt.get("logging", {})
                switch = (ckpt.get("versemi") or {}).get("switch_epoch")
                losses = [float(v) for v in log.get("train_losses", [])]
                out[str(fold)] = {
                    "steps": [(e + 1) * iterations for e in range(len(losses))],
                    "train_loss": losses,
                    "val_loss": [float(v) for v in log.get("val_losses", [])],
                    "pseudo_dice": [float(v) for v in log.get("mean_fg_dice", [])],
                    "switch_step": None if switch is None else switch * iterations,
                }
                if table is not None:
                    out[str(fold)]["pseudo_dice_per_task"] = _per_task_dice(
                        table, log.get("dice_per_class_or_region", []))
                break
    return out


def _case_rows(m, ev: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """One row per test case of method ``m`` (its classes averaged per metric), also grouped by task."""
    rows, per_task = [], {}
    for case, r in sorted(ev["cases"].items()):
        row = {"method": m.key, "method_label": m.label, "task": r["task"], "case": case}
        for key in ("dice", "hd95", "iou", "asd"):
            row[key] = _case_mean(r["metrics"], key)
        # false-positive components: summed over the task's classes (what a reader counts in the image)
        row["fp_components"] = float(sum(m.get("fp_components") or 0 for m in r["metrics"].values()))
        rows.append(row)
        per_task.setdefault(r["task"], []).append(row)
    return rows, per_task


def _method_summary(per_task: dict[str, list[dict]], tasks: list[str]) -> dict:
    """Dice and HD95 statistics per task of one method, and their unweighted mean over tasks."""
    s = {}
    for t in tasks:
        rows = per_task.get(t, [])
        s[t] = {
            "dice": _stats([r["dice"] for r in rows]),
            "hd95": _stats([r["hd95"] for r in rows]),
            "fp_components": _stats([r["fp_components"] for r in rows]),
            "n": len(rows),
        }
    s[MEAN_ROW] = {"n": sum(s[t]["n"] for t in tasks)}
    for key in SUMMARY_METRICS:
        means = [s[t][key]["mean"] for t in tasks if s[t][key]["mean"] is not None]
        s[MEAN_ROW][key] = {"mean": float(np.mean(means)) if means else None, "std": None, "n": len(means)}
    return s


def _dice_minus_baseline(summary: dict, tasks: list[str], baseline: str) -> dict:
    """Per method and task (and the mean over tasks): mean Dice minus the baseline's; empty without baseline."""
    diff = {}
    if baseline in summary:
        for key, s in summary.items():
            diff[key] = {}
            for t in [*tasks, MEAN_ROW]:
                a, b = summary[baseline][t]["dice"]["mean"], s[t]["dice"]["mean"]
                diff[key][t] = None if a is None or b is None else b - a
    return diff


def _run_curves(states: list[dict]) -> dict:
    """Learning curves of every run, or the error that reading its checkpoints raised."""
    curves = {}
    for st in states:
        try:
            curves[st["run"]] = learning_curves(st["model_folder"], st["folds"], st["budget"]["iterations"])
        except Exception as e:  # a broken checkpoint must not lose the report
            curves[st["run"]] = {"error": repr(e)}
    return curves


def training_warnings(model_folder: str, folds: list) -> dict[str, list[str]]:
    """{fold: the WARNING lines of its nnU-Net training logs (every invocation's log, oldest first, each line once)}
    for the folds that have any: a task that never learned its foreground, an unlabeled term on empty targets,
    ... (docs/METHOD.md). A run's report carries them so that a user reading it sees what its training log said."""
    out = {}
    for fold in folds:
        logs = sorted(glob.glob(join(model_folder, f"fold_{fold}", "training_log_*.txt")))
        found: list[str] = []
        for path in logs:
            with open(path, errors="replace") as f:
                for line in f:
                    text = line.split(": ", 1)[1].strip() if ": WARNING" in line else line.strip()
                    if text.startswith("WARNING") and text not in found:
                        found.append(text)
        if found:
            out[str(fold)] = found
    return out


def collect(
    evals: dict[str, dict], states: list[dict], table: TaskTable, methods: list, baseline: str, meta: dict
) -> dict:
    """The report's content. ``evals``: method key -> evaluate_folders result; ``methods``: run.Method list."""
    tasks = [t.name for t in table.tasks if any(t.name in e["tasks"] for e in evals.values())]
    cases, summary = [], {}
    for m in methods:
        rows, per_task = _case_rows(m, evals[m.key])
        cases += rows
        summary[m.key] = _method_summary(per_task, tasks)
    diff = _dice_minus_baseline(summary, tasks, baseline)
    curves = _run_curves(states)
    return nan_to_none(
        {
            **meta,
            "methods": [
                {"key": m.key, "letter": m.letter, "label": m.label, "trainer": m.trainer} for m in methods
            ],
            "baseline": baseline,
            "tasks": tasks,
            "summary": summary,
            "dice_minus_baseline": diff,
            "cases": cases,
            "runs": states,
            "curves": curves,
            "training_warnings": {st["run"]: w for st in states
                                  if (w := training_warnings(st["model_folder"], st["folds"]))},
        }
    )


def markdown_table(labels: list[str], rows: list[str], cell, first: str = "task") -> list[str]:
    """Lines of a markdown table: one column per label, one row per row name; ``cell(row, column index)``."""
    lines = [f"| {first} | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines += [f"| {r} | " + " | ".join(cell(r, i) for i in range(len(labels))) + " |" for r in rows]
    return lines


def _fmt(stats: dict, digits: int, scale: float = 1.0) -> str:
    if stats["mean"] is None:
        return "n/a"
    if stats.get("std") is None:
        return f"{stats['mean'] * scale:.{digits}f}"
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def _signed(v: float | None, scale: float = 100.0) -> str:
    return "n/a" if v is None else f"{v * scale:+.1f}"


def _markdown_header(results: dict) -> list[str]:
    """Title and the bullet list of command, budget, device and test cases."""
    b = results["budget"]
    return [
        f"# VerSemi benchmark: {results['dataset']} ({results['configuration']})",
        "",
        f"- command: `{results['command']}`",
        f"- budget per trained model: {b['epochs']} epochs x {b['iterations']} iterations "
        f"(+ {b['val_iterations']} validation iterations per epoch)"
        + (
            f"; runs on the union: {len(results['tasks'])} x the iterations (--budget-per task)"
            if results.get("budget_per") == "task"
            else ""
        )
        + f"; folds {results['folds']}; plans {', '.join(np.atleast_1d(results['benchmark_plans']))}",
        f"- device: {results['device']}; machine: {results['machine'].get('cpu_count')} CPU cores, "
        f"{'GPU ' + results['machine']['gpu'] if results['machine'].get('gpu') else 'no GPU'}; "
        f"test-time mirroring: {'on' if results['tta'] else 'off'}",
        f"- test cases per task: {', '.join(f'{t} {len(c)}' for t, c in results['test_cases'].items())}",
        "",
    ]


def _dice_section(results: dict, rows: list[str]) -> list[str]:
    """The Dice table: mean ± std per task and method, with the difference to the baseline in brackets."""
    methods = results["methods"]
    lines = [
        "## Dice (%), mean ± std over test cases; in brackets the difference to "
        + next((m["label"] for m in methods if m["key"] == results["baseline"]), results["baseline"]),
        "",
        "| task | " + " | ".join(m["label"] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    diff = results["dice_minus_baseline"]
    for t in rows:
        cells = []
        for m in methods:
            s = results["summary"][m["key"]][t]["dice"]
            cell = _fmt(s, 1, 100)
            if diff and m["key"] != results["baseline"]:
                cell += f" ({_signed(diff[m['key']][t])})"
            cells.append(cell)
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines


def _hd95_section(results: dict, rows: list[str]) -> list[str]:
    """The HD95 table: mean ± std (and n) per task and method."""
    methods = results["methods"]
    lines = [
        "",
        "## HD95 (mm), mean ± std over test cases with both masks non-empty",
        "",
    ]

    def hd95(t: str, i: int) -> str:
        s = results["summary"][methods[i]["key"]][t]["hd95"]
        return f"{_fmt(s, 2)} (n={s['n']})" if s["mean"] is not None else "n/a"

    lines += markdown_table([m["label"] for m in methods], rows, hd95)
    lines += ["", "## False-positive components per test case (mean), prediction components touching no "
              "reference voxel of their class", ""]

    def fp(t: str, i: int) -> str:
        s = results["summary"][methods[i]["key"]][t].get("fp_components") or {"mean": None}
        return "n/a" if s["mean"] is None else f"{s['mean']:.1f}"

    lines += markdown_table([m["label"] for m in methods], rows, fp)
    return lines


def _runs_section(results: dict) -> list[str]:
    """The table of runs: trainer, dataset, budget, training and prediction seconds, skipped or not."""
    lines = [
        "",
        "## Runs",
        "",
        "| run | trainer | dataset | epochs x iterations | train (s) | predict (s) | skipped this time |",
        "|---|---|---|---|---|---|---|",
    ]
    for st in results["runs"]:
        train = sum((st.get("train_seconds") or {}).values()) if st.get("train_seconds") else 0.0
        lines.append(
            f"| {st['run']} | {st['trainer']} | {st['dataset']} | "
            f"{st['budget']['epochs']} x {st['budget']['iterations']} | {train:.0f} | "
            f"{(st.get('predict_seconds') or 0):.0f} | {'yes' if st.get('skipped_on_last_invocation') else 'no'} |"
        )
    return lines


def _warnings_section(results: dict) -> list[str]:
    """The WARNING lines of the runs' training logs, if any."""
    found = results.get("training_warnings") or {}
    if not found:
        return []
    lines = ["", "## Warnings in the training logs", ""]
    for run, folds in found.items():
        lines += [f"- {run}, fold {fold}: {w}" for fold, ws in folds.items() for w in ws]
    return lines


def markdown(results: dict) -> str:
    rows = [*results["tasks"], MEAN_ROW]
    lines = _markdown_header(results)
    lines += _dice_section(results, rows)
    lines += _warnings_section(results)
    lines += _hd95_section(results, rows)
    lines += _runs_section(results)
    lines += [
        "",
        f"Figures: `{BOXPLOT_PNG}` (Dice per test case, per task and method), `{CURVES_PNG}` (train loss and "
        "nnU-Net's pseudo Dice per epoch of every run). Per-case numbers: `results.csv`; aggregates: "
        "`summary.csv`; everything: `results.json`; per-method evaluation (IoU, ASD, per class): `evaluation/`.",
        "",
    ]
    return "\n".join(lines)


def _csv_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def boxplot(results: dict, path: str) -> None:
    plt = pyplot()
    # nnU-Net's progress plots switch seaborn's poster style on for the whole process: plot in matplotlib's own
    with plt.style.context("default"):
        _boxplot(plt, results, path)


def _boxplot(plt, results: dict, path: str) -> None:
    tasks, methods = results["tasks"], results["methods"]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(3.2 * max(1, len(tasks)) + 1, 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        data = [
            [
                r["dice"]
                for r in results["cases"]
                if r["task"] == t and r["method"] == m["key"] and r["dice"] is not None
            ]
            for m in methods
        ]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1), [m["letter"] for m in methods])
        ax.set_title(t)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("Dice")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(" | ".join(f"{m['letter']}: {m['label'][4:]}" for m in methods), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_plot(results: dict, path: str) -> None:
    plt = pyplot()
    with plt.style.context("default"):
        _curves_plot(plt, results, path)


def _curves_plot(plt, results: dict, path: str) -> None:
    methods = results["methods"]
    fig, axes = plt.subplots(len(methods), 2, figsize=(10, 2.6 * len(methods) + 0.5), squeeze=False)
    for row, m in zip(axes, methods):
        for st in results["runs"]:
            if st["method"] != m["key"]:
                continue
            for fold, c in (results["curves"].get(st["run"]) or {}).items():
                if not isinstance(c, dict) or "train_loss" not in c:
                    continue
                label = (st["task"] + " " if st.get("task") else "") + f"fold {fold}"
                steps = c.get("steps") or list(range(1, len(c["train_loss"]) + 1))
                row[0].plot(steps[: len(c["train_loss"])], c["train_loss"], marker=".", label=label)
                dice = [np.nan if v is None else v for v in c["pseudo_dice"]]
                per_task = c.get("pseudo_dice_per_task") or {}
                row[1].plot(steps[: len(dice)], dice, marker=".", label=label + (", mean" if per_task else ""),
                            color="black" if per_task else None)
                for task, values in per_task.items():  # a union model: each task under its prompt
                    values = [np.nan if v is None else v for v in values]
                    row[1].plot(steps[: len(values)], values, lw=1, label=f"{task}, fold {fold}")
                if c.get("switch_step") is not None:
                    for ax in row:
                        ax.axvline(c["switch_step"], color="grey", ls="--", lw=0.8)
        row[0].set_title(f"{m['label']}: train loss", fontsize=9)
        row[1].set_title(f"{m['label']}: pseudo Dice (validation patches)", fontsize=9)
        row[1].set_ylim(-0.02, 1.02)
        for ax in row:
            ax.set_xlabel("optimizer steps (dashed: unlabeled terms switched on)")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: str, results: dict) -> list[str]:
    """Write results.json, results.csv, summary.csv, report.md and the two PNGs; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        k: join(out_dir, v)
        for k, v in (
            ("json", RESULTS_JSON),
            ("csv", RESULTS_CSV),
            ("sum", SUMMARY_CSV),
            ("md", REPORT_MD),
            ("box", BOXPLOT_PNG),
            ("curves", CURVES_PNG),
        )
    }
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CASE_COLUMNS)
        for r in results["cases"]:
            w.writerow([_csv_value(r[k]) for k in CASE_COLUMNS])
    labels = {m["key"]: m["label"] for m in results["methods"]}
    with open(paths["sum"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_COLUMNS)
        for key, s in results["summary"].items():
            for t in [*results["tasks"], MEAN_ROW]:
                d, h, fp = s[t]["dice"], s[t]["hd95"], s[t].get("fp_components") or {"mean": None}
                diff = (results["dice_minus_baseline"].get(key) or {}).get(t)
                w.writerow(
                    [
                        key,
                        labels[key],
                        t,
                        s[t]["n"],
                        _csv_value(d["mean"]),
                        _csv_value(d["std"]),
                        _csv_value(h["mean"]),
                        _csv_value(h["std"]),
                        _csv_value(fp["mean"]),
                        _csv_value(diff),
                    ]
                )
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    boxplot(results, paths["box"])
    curves_plot(results, paths["curves"])
    return list(paths.values())
