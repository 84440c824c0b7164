"""Report of :mod:`nnunetv2_versemi.benchmark.speed`: the ratios between the contenders' times and memory,
and the results as markdown tables."""

from __future__ import annotations

import argparse
import math


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def training_ratios(args: argparse.Namespace, main_tasks: int, train: dict) -> dict[str, float | None]:
    med = {k: v["median_s"] for k, v in train.items()}
    ratios = {f"versemi@{main_tasks} / nnunet (step time)": _ratio(med[f"versemi@{main_tasks}"], med["nnunet"])}
    scale = sorted(set(args.scale_tasks))
    if len(scale) >= 2:
        lo, hi = scale[0], scale[-1]
        ratios[f"versemi@{hi} / versemi@{lo} (step time)"] = _ratio(med[f"versemi@{hi}"], med[f"versemi@{lo}"])
    if not args.no_reference:
        r = args.ref_tasks
        ratios[f"per_prompt@{r} / versemi@{r} (step time)"] = _ratio(med[f"per_prompt@{r}"], med[f"versemi@{r}"])
    for name in args.trainers:
        ratios[f"{name}@{main_tasks} / nnunet (step time)"] = _ratio(med[f"{name}@{main_tasks}"], med["nnunet"])
    if not args.no_memory:
        ratios[f"versemi@{main_tasks} / nnunet (peak memory)"] = _ratio(
            train[f"versemi@{main_tasks}"].get("peak_mib"), train["nnunet"].get("peak_mib"))
    return ratios


def markdown(result: dict) -> str:
    lines = [
        f"Speed: {result['source']}, configuration {result['configuration']}, batch {result['batch_size']}, "
        f"patch {result['patch_size']}, device {result['device']} ({result['threads']} threads, "
        f"{result['cpu_count']} CPUs), {result['steps']} interleaved steps after {result['warmup']} warm-up",
        "",
        "| contender | tasks | median step (s) | min (s) | peak memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, v in result["training"].items():
        mem = v.get("peak_mib")
        lines.append(
            f"| {name} | {v['tasks']} | {v['median_s']:.3f} | {v['min_s']:.3f} | "
            f"{'n/a' if mem is None else f'{mem:.0f}'} |"
        )
    if "prediction" in result:
        p = result["prediction"]
        lines += [
            "",
            f"Sliding window on a {p['image_shape']} image (TTA {'on' if p['tta'] else 'off'}):",
            "",
            "| predictor | median (s) |",
            "|---|---|",
        ]
        for m in ("nnunet", "task", "all"):
            lines.append(f"| {m} | {p[m]['median_s']:.3f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for k, v in result["ratios"].items():
        lines.append(f"| {k} | {'n/a' if v is None else f'{v:.2f}'} |")
    return "\n".join(lines) + "\n"
