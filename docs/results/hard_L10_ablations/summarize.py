"""What each unlabeled term adds on the `hard` preset at 10 % labels, 3 seeds, for the default before the closing phase
(the default of ../benchmark_hard_L10_seed{s}.json): the paper's L_unsup alone (`_unsupOnly`: no L_pseudo) and
L_pseudo alone (`_pseudoOnly`: no L_unsup), set against both terms (d) and per-task nnU-Net (a) of the same draws.

Seeds 1 and 2: ../benchmark_hard_L10_seed{1,2}_ablations.json (also labeled-only VerSemi (c)). Seed 0: the report
folders of `--methods VerSemiTrainer_unsupOnly_noSupFinish` and `--methods VerSemiTrainer_pseudoOnly_noSupFinish`
on the seed-0 union (the same draw as ../benchmark_hard_L10_seed0.json, whose (a) and (d) they are set against).

Usage: python docs/results/hard_L10_ablations/summarize.py OUT_UNSUP_S0 OUT_PSEUDO_S0. Writes results.json and
learning_curves.png here.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nnunetv2_versemi.benchmark.seeds import paired_difference  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)
TASKS = ["HardOrganCT", "HardKidneyCT", "HardProstateMR"]
LABELS = {"alone": "a", "versemi": "d", "noUnsup": "c",
          "VerSemiTrainer_unsupOnly": "L_unsup only", "VerSemiTrainer_unsupOnly_noSupFinish": "L_unsup only",
          "VerSemiTrainer_pseudoOnly": "L_pseudo only", "VerSemiTrainer_pseudoOnly_noSupFinish": "L_pseudo only"}
MODELS = ["a", "c", "d", "L_unsup only", "L_pseudo only"]


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def relabel(results: dict, keys: list[str]) -> tuple[list[dict], dict]:
    """The cases of ``keys`` with the method renamed to its model label, and their learning curves."""
    cases = [{**c, "method": LABELS[c["method"]]} for c in results["cases"] if c["method"] in keys]
    curves = {LABELS[k]: results["curves"][k]["all"] for k in keys if k in results.get("curves", {})}
    return cases, curves


def mean_dice(cases: list[dict], model: str) -> dict | None:
    per_task = {t: [c["dice"] for c in cases if c["method"] == model and c["task"] == t] for t in TASKS}
    if not all(per_task.values()):
        return None
    m = {t: round(100 * float(np.mean(v)), 2) for t, v in per_task.items()}
    return {**m, "mean over tasks": round(float(np.mean(list(m.values()))), 2)}


def main(out_unsup: str, out_pseudo: str) -> None:
    seeds = []
    cases, curves = relabel(load(os.path.join(RESULTS, "benchmark_hard_L10_seed0.json")), ["alone", "versemi"])
    for folder, key in ((out_unsup, "VerSemiTrainer_unsupOnly_noSupFinish"),
                        (out_pseudo, "VerSemiTrainer_pseudoOnly_noSupFinish")):
        c, cv = relabel(load(os.path.join(folder, "results.json")), [key])
        cases += c
        curves.update(cv)
    seeds.append({"cases": cases, "curves": curves})
    for s in (1, 2):
        c, cv = relabel(load(os.path.join(RESULTS, f"benchmark_hard_L10_seed{s}_ablations.json")),
                        ["alone", "versemi", "noUnsup", "VerSemiTrainer_unsupOnly", "VerSemiTrainer_pseudoOnly"])
        seeds.append({"cases": c, "curves": cv})
    pairs = [("d", "L_unsup only"), ("d", "L_pseudo only"), ("L_unsup only", "a"), ("L_pseudo only", "a"),
             ("d", "a"), ("L_unsup only", "c"), ("L_pseudo only", "c"), ("d", "c")]
    out = {"what": __doc__.split("\n\n")[0],
           "command": "python docs/results/hard_L10_ablations/summarize.py " + f"{out_unsup} {out_pseudo}",
           "seed0_commands": [load(os.path.join(d, "results.json"))["command"] for d in (out_unsup, out_pseudo)],
           "machine": "2 CPU cores, no GPU; shared with other benchmark processes (Dice only)",
           "per_seed": [{m: mean_dice(s["cases"], m) for m in MODELS if mean_dice(s["cases"], m)} for s in seeds],
           "paired_differences": {f"{a} - {b}": paired_difference(seeds, a, b, TASKS) for a, b in pairs},
           "note": "(c) is on seeds 1-2 only; every other difference is over 3 seeds x 36 test cases"}
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    for s, m in enumerate(out["per_seed"]):
        print(f"seed {s}:", {k: v["mean over tasks"] for k, v in m.items()})
    for k, v in out["paired_differences"].items():
        print(k, {t: f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] (n={d['n']})"
                  for t, d in v.items() if d["n"] > 1})
    plot(seeds, os.path.join(HERE, "learning_curves.png"))


def plot(seeds: list[dict], path: str) -> None:
    """Top: pseudo Dice (mean over tasks) per seed and model. Bottom: seed 0's pseudo Dice per task."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    colours = {"c": "tab:grey", "d": "black", "L_unsup only": "tab:blue", "L_pseudo only": "tab:orange"}
    for s, (ax, seed) in enumerate(zip(axes[0], seeds)):
        for model, c in seed["curves"].items():
            if model in colours:
                ax.plot(c["steps"], c["pseudo_dice"], color=colours[model], label=model)
        ax.set_title(f"seed {s}: pseudo Dice, mean over tasks", fontsize=9)
    for ax, task in zip(axes[1], TASKS):
        for model, c in seeds[0]["curves"].items():
            if task in (c.get("pseudo_dice_per_task") or {}):
                values = [np.nan if v is None else v for v in c["pseudo_dice_per_task"][task]]
                ax.plot(c["steps"][: len(values)], values, color=colours[model], label=model)
        ax.set_title(f"seed 0, {task}: pseudo Dice", fontsize=9)
    for ax in axes.ravel():
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("optimizer steps")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(*sys.argv[1:])
