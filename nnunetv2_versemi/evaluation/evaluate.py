"""``nnUNetv2_versemi_evaluate``: per-task Dice, IoU, HD95 and ASD of a prediction folder.

Without ``--task`` the folders hold union-format label maps (merged values); each case is scored on
the classes of its own task (from its case id, ``TaskTable.task_of_case``), so a CT case is never
penalised for, or credited with, the classes of another task. With ``--task NAME`` the folders hold
that task's source label values (what ``nnUNetv2_versemi_predict --task`` writes) and every case is
scored on that task's classes. Metric definitions and empty-mask conventions: ``metrics.py``.

Outputs (``-o``, default ``PRED/evaluation``): ``metrics.json``, ``metrics.csv``, ``summary.md`` and,
with ``--png``, ``overlays/<case>.png``. Every input check (missing files, unknown task or case,
shape/spacing mismatch) runs before anything is written.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunetv2_versemi.evaluation.labelio import (
    EvaluationError,
    find_image,
    list_label_files,
    read_label_map,
    resample_to_reference,
)
from nnunetv2_versemi.evaluation.metrics import METRICS, aggregate, compute_case_metrics
from nnunetv2_versemi.imageio import geometry_difference
from nnunetv2_versemi.inputs import output_folder_problem
from nnunetv2_versemi.tasktable import TaskTable, TaskTableError

PROG = "nnUNetv2_versemi_evaluate"
# files nnU-Net writes next to predictions; never label maps
# ---- evaluation -------------------------------------------------------------------------------------
def _evaluate_case(job: dict) -> dict:
    """Worker: read one reference/prediction pair, check they match, compute the metrics."""
    ref, ref_geometry = read_label_map(job["ref_file"])
    pred, pred_geometry = read_label_map(job["pred_file"])
    case = job["case"]
    resampled = None
    mismatch = geometry_mismatch(case, job["ref_file"], ref.shape, ref_geometry, job["pred_file"], pred.shape,
                                 pred_geometry)
    if mismatch is not None:
        if not job.get("allow_geometry_mismatch"):
            raise EvaluationError(f"{mismatch}. A prediction is scored in its reference's voxel grid; resample it "
                                  "into the reference's geometry, or pass --allow-geometry-mismatch to have it "
                                  "resampled here (nearest neighbour)")
        pred = resample_to_reference(job["pred_file"], job["ref_file"]).reshape(ref.shape)
        resampled = mismatch
    ref_spacing = tuple(float(x) for x in ref_geometry["spacing"])
    names = [n for n, _ in job["labels"]]
    values = [v for _, v in job["labels"]]
    space = job["label_space"]
    # a file in the wrong label space scores nonsense (an empty prediction against a reference whose values are
    # no label of the task: Dice 1): refuse it. A prediction may hold other tasks' labels (merged space).
    for kind, arr, allowed, f in (("reference", ref, {0, *values}, job["ref_file"]),
                                  ("prediction", pred, {0, *job["pred_values"]}, job["pred_file"])):
        unexpected = sorted(set(np.unique(arr).tolist()) - allowed)
        if unexpected:
            raise EvaluationError(
                f"Case {case}: {kind} {f} holds value(s) {unexpected[:10]} that are no {space} label "
                f"{'of task ' + job['task'] + ' ' if kind == 'reference' else ''}(allowed: {sorted(allowed)}). "
                + ("Files in the union's merged label values are evaluated without --task."
                   if space == "source" else "Files in a source dataset's label values need --task NAME."))
    by_value = compute_case_metrics(ref, pred, values, ref_spacing)
    return {
        "case": case,
        "task": job["task"],
        "ref_file": job["ref_file"],
        "pred_file": job["pred_file"],
        "shape": list(ref.shape),
        "spacing": list(ref_spacing),
        "resampled": resampled,
        "metrics": {n: {"label": v, **by_value[v]} for n, v in zip(names, values)},
    }


def geometry_mismatch(case: str, ref_file: str, ref_shape: tuple, ref_geometry: dict, pred_file: str,
                      pred_shape: tuple, pred_geometry: dict) -> str | None:
    """How a prediction's voxel grid differs from its reference's (shape, spacing, origin, direction), naming
    the case and the field; None when they agree within float noise. A prediction shifted by 100 mm or stored
    flipped (with its direction) is a different grid: comparing voxel arrays would give a wrong Dice."""
    if tuple(ref_shape) != tuple(pred_shape):
        return f"Case {case}: reference {ref_file} has shape {tuple(ref_shape)} but prediction {pred_file} has " \
               f"shape {tuple(pred_shape)}"
    difference = geometry_difference(ref_geometry, pred_geometry)
    if difference is None:
        return None
    field = difference.split(" ", 1)[0]
    return (f"Case {case}: reference {ref_file} has {field} {_show(ref_geometry.get(field))} but prediction "
            f"{pred_file} has {field} {_show(pred_geometry.get(field))}")


def _show(values) -> str:
    return "(missing)" if values is None else str(tuple(round(float(v), 4) for v in np.ravel(values)))


def _run_jobs(jobs: list[dict], num_processes: int, verbose: bool) -> list[dict]:
    n = min(num_processes, len(jobs))
    if n <= 1:
        return [_evaluate_case(j) for j in tqdm(jobs, desc="evaluate", disable=not verbose)]
    # spawn: no forked copies of a parent that may hold CUDA or OpenMP state
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        return list(
            tqdm(pool.imap(_evaluate_case, jobs), total=len(jobs), desc="evaluate", disable=not verbose)
        )


def evaluate_folders(
    ref_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    table: TaskTable,
    task: str | None = None,
    num_processes: int = 1,
    file_ending: str | None = None,
    output_dir: str | os.PathLike | None = None,
    png: int = 0,
    images_dir: str | os.PathLike | None = None,
    verbose: bool = False,
    allow_geometry_mismatch: bool = False,
) -> dict:
    """Evaluate every reference case in ``ref_dir`` against the same-named file in ``pred_dir``.

    ``task=None``: union-format files (merged values), each case on its own task's classes.
    ``task=NAME``: files in that task's source values, every case on that task's classes.
    Returns ``{"cases": {case: {...,"metrics": {class: {...}}}}, "tasks": {task: aggregate}, "overall",
    "extra_predictions", ...}``. With ``output_dir`` also writes metrics.json/csv, summary.md and
    ``png`` overlays per task (see ``write_outputs``). Raises ``EvaluationError``/``TaskTableError``
    before writing anything when inputs are inconsistent. A prediction whose geometry (shape, spacing, origin,
    direction) differs from its reference's is refused, or with ``allow_geometry_mismatch`` resampled into the
    reference's grid and marked ``resampled`` in its case record.
    """
    task_idx = table.index(task) if task is not None else None  # TaskTableError listing the valid tasks
    if output_dir is not None and (problem := output_folder_problem(output_dir)) is not None:
        raise EvaluationError(problem)
    jobs, extra = _case_jobs(ref_dir, pred_dir, table, task_idx, file_ending)
    for j in jobs:
        j["allow_geometry_mismatch"] = allow_geometry_mismatch
    overlay_cases = select_overlay_cases(jobs, png)
    if images_dir is not None:
        for case in overlay_cases:
            if find_image(images_dir, case) is None:
                raise EvaluationError(f"No image {case}_0000.<ending> in {images_dir} for the overlay of case {case}")
    records = _run_jobs(jobs, num_processes, verbose)
    results = _aggregate_results(records, table, task, ref_dir, pred_dir, extra)
    resampled = [r["case"] for r in records if r["resampled"]]
    if verbose and resampled:
        print(f"Warning: {len(resampled)} prediction(s) resampled into their reference's geometry "
              f"(--allow-geometry-mismatch): {', '.join(resampled[:10])}")
    if verbose and extra:
        print(f"Warning: {len(extra)} prediction(s) without a reference, not evaluated: {', '.join(extra[:10])}")
    if output_dir is not None:
        write_outputs(results, output_dir, overlay_cases=overlay_cases, table=table, images_dir=images_dir)
    return results


def _case_jobs(ref_dir, pred_dir, table: TaskTable, task_idx: int | None, file_ending: str | None
               ) -> tuple[list[dict], list[str]]:
    """Pair reference and prediction files, give each case its task's classes in the files' label space
    (merged without ``task_idx``, that task's source values with it); the predictions without reference."""
    ref_files, _ = list_label_files(ref_dir, file_ending)
    pred_files, pred_ending = list_label_files(pred_dir, file_ending)
    missing = sorted(set(ref_files) - set(pred_files))
    if missing:
        shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise EvaluationError(
            f"{len(missing)} reference case(s) have no prediction in {pred_dir}: {shown} "
            f"(expected e.g. {Path(pred_dir) / (missing[0] + pred_ending)})"
        )
    source = task_idx is not None
    jobs = []
    for case, ref_file in sorted(ref_files.items()):
        if source:
            ti = task_idx
        else:
            try:
                ti = table.task_of_case(case)
            except TaskTableError as e:
                raise EvaluationError(f"Reference file {ref_file}: {e}") from e
        t = table.tasks[ti]
        jobs.append({
            "case": case, "task": t.name, "ref_file": ref_file, "pred_file": pred_files[case],
            "labels": [(lab.name, lab.source if source else lab.merged) for lab in t.labels],
            "label_space": "source" if source else "merged",
            "pred_values": t.source_values if source else range(1, table.num_merged_labels),
        })
    return jobs, sorted(set(pred_files) - set(ref_files))


def _aggregate_results(records: list[dict], table: TaskTable, task: str | None, ref_dir, pred_dir,
                       extra: list[str]) -> dict:
    """Per-case records -> the results dict: per task the mean/std over cases of each class and of the
    mean over classes, and the mean over tasks."""
    results = {
        "ref_dir": str(ref_dir),
        "pred_dir": str(pred_dir),
        "task": task,
        "label_space": "source" if task is not None else "merged",
        "distance_unit": "mm",
        "conventions": {
            "both_empty": "dice = iou = 1, hd95 = asd = 0 (counted in means)",
            "one_empty": "dice = iou = 0, hd95 = asd = NaN (null in JSON; left out of distance means)",
            "mean_over_classes": "per case mean over the task's classes, then mean/std over cases",
            "std": "population std (ddof=0)",
        },
        "cases": {r["case"]: r for r in records},
        "tasks": {},
        "extra_predictions": extra,
        "resampled": sorted(r["case"] for r in records if r["resampled"]),
    }
    for t in table.tasks:
        task_records = [r for r in records if r["task"] == t.name]
        if not task_records:
            continue
        agg = aggregate([r["metrics"] for r in task_records])
        for name, lab in zip(agg["classes"], t.labels):
            agg["classes"][name] = {"label": lab.source if task is not None else lab.merged, **agg["classes"][name]}
        results["tasks"][t.name] = agg
    results["overall"] = {
        m: _mean_of([agg["mean_over_classes"][m]["mean"] for agg in results["tasks"].values()]) for m in METRICS
    }
    results["overall"]["n_tasks"] = len(results["tasks"])
    return results


def _mean_of(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def select_overlay_cases(jobs_or_cases: list[dict], n: int) -> list[str]:
    """The first ``n`` cases (sorted by id) of every task."""
    per_task: dict[str, list[str]] = {}
    for j in sorted(jobs_or_cases, key=lambda j: j["case"]):
        per_task.setdefault(j["task"], [])
        if len(per_task[j["task"]]) < n:
            per_task[j["task"]].append(j["case"])
    return [c for cases in per_task.values() for c in cases]


# ---- outputs ----------------------------------------------------------------------------------------
def _json_safe(obj):
    """NaN -> None (JSON has no NaN), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


CSV_COLUMNS = ["case", "task", "class", "label", *METRICS, "n_ref", "n_pred"]


def _fmt(stats: dict, digits: int) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def summary_markdown(results: dict) -> str:
    space = f"source labels of task {results['task']}" if results["task"] else "merged labels"
    lines = [
        "# VerSemi evaluation",
        "",
        f"- reference: `{results['ref_dir']}`",
        f"- prediction: `{results['pred_dir']}` ({space})",
        f"- cases: {len(results['cases'])}; predictions without reference (not evaluated): "
        f"{len(results['extra_predictions'])}",
        *([f"- resampled into the reference's geometry (--allow-geometry-mismatch): {', '.join(results['resampled'])}"]
          if results.get("resampled") else []),
        "",
        "Mean ± std over cases. HD95 and ASD in mm; cases where exactly one of reference and prediction is "
        "empty have no distance and are left out of the distance means (column *one empty*). Both empty "
        "counts as Dice 1, distance 0.",
        "",
        "| task | class | n | Dice | IoU | HD95 (mm) | ASD (mm) | one empty |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tname, agg in results["tasks"].items():
        for cname, c in agg["classes"].items():
            lines.append(
                f"| {tname} | {cname} ({c['label']}) | {c['n']} | {_fmt(c['dice'], 3)} | {_fmt(c['iou'], 3)} | "
                f"{_fmt(c['hd95'], 2)} | {_fmt(c['asd'], 2)} | {c['n_one_empty']} |"
            )
        m = agg["mean_over_classes"]
        lines.append(
            f"| {tname} | *mean over classes* | {agg['n_cases']} | {_fmt(m['dice'], 3)} | {_fmt(m['iou'], 3)} | "
            f"{_fmt(m['hd95'], 2)} | {_fmt(m['asd'], 2)} | |"
        )
    o = results["overall"]

    def f(v, d):
        return "n/a" if v is None else f"{v:.{d}f}"

    lines += [
        "",
        f"Mean over tasks ({o['n_tasks']}): Dice {f(o['dice'], 3)}, IoU {f(o['iou'], 3)}, "
        f"HD95 {f(o['hd95'], 2)} mm, ASD {f(o['asd'], 2)} mm.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(
    results: dict,
    output_dir: str | os.PathLike,
    overlay_cases: list[str] | None = None,
    table: TaskTable | None = None,
    images_dir: str | os.PathLike | None = None,
) -> None:
    """Write metrics.json, metrics.csv (one row per case x class), summary.md and overlays/<case>.png."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_json_safe(results), indent=2))
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for case, r in results["cases"].items():
            for cname, m in r["metrics"].items():
                row = [case, r["task"], cname, m["label"]]
                row += ["" if math.isnan(m[k]) else repr(float(m[k])) for k in METRICS]
                row += [m["n_ref"], m["n_pred"]]
                w.writerow(row)
    (out / "summary.md").write_text(summary_markdown(results))
    if overlay_cases:
        from nnunetv2_versemi.evaluation.overlays import render_case_overlay

        (out / "overlays").mkdir(exist_ok=True)
        for case in overlay_cases:
            r = results["cases"][case]
            render_case_overlay(
                out / "overlays" / f"{case}.png",
                ref_file=r["ref_file"],
                pred_file=r["pred_file"],
                labels=[(n, m["label"]) for n, m in r["metrics"].items()],
                image_file=find_image(images_dir, case) if images_dir is not None else None,
                title=f"{case} ({r['task']})",
                dice={n: m["dice"] for n, m in r["metrics"].items()},
            )
