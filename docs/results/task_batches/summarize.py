"""Task batches on the `paper` preset at 20 % labels: the default with one planned nnU-Net batch per task in each
step (`VerSemiTrainer_taskBatches`) and the same with nnU-Net's own Dice (`VerSemiTrainer_taskBatches_nnunetDice`),
trained on the labeled draws of the benchmark's seeds 0-2 (unions Dataset98{0,1,2}_PaperGeoL20S{s}: the same
labeled and test cases as ../benchmark_P20_closing_seed{s}.json), set against that benchmark's per-task nnU-Net (a)
and default (d), and against labeled-only VerSemi (c) of ../union_terms.

Usage: python docs/results/task_batches/summarize.py OUT_TB_S0 OUT_TB_S1 OUT_TB_S2 [--nnunet-dice OUT_S0 ...]
(each OUT a report folder of `nnUNetv2_versemi_benchmark -d 98<s> ... --methods <trainer>`; nnUNet_raw set as for
the runs). Writes results.json here: mean Dice, HD95 and false-positive components per seed, task and model, and
paired differences per task and over all tasks (seeds x test cases, 95 % t intervals).
"""
import argparse
import json
import os

import numpy as np

from nnunetv2_versemi.benchmark.seeds import paired_difference, t_interval

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)
TASKS = ["Pancreas", "LA", "Spleen", "Lung"]
TB, TBD = "VerSemiTrainer_taskBatches", "VerSemiTrainer_taskBatches_nnunetDice"
LABELS = {"alone": "a", "VerSemiTrainer_supFinish40": "d", "VerSemiTrainer_noUnsup": "c", TB: "taskBatches",
          TBD: "taskBatches_nnunetDice"}


def cases_of(results_file: str, methods: list[str]) -> list[dict]:
    r = json.load(open(results_file))
    return [{**c, "method": LABELS[c["method"]]} for c in r["cases"] if c["method"] in methods]


def means(cases: list[dict], model: str) -> dict:
    out = {}
    for metric in ("dice", "hd95", "fp_components"):
        per_task = {t: [c[metric] for c in cases if c["method"] == model and c["task"] == t and c[metric] is not None]
                    for t in TASKS}
        if not all(per_task.values()):
            continue
        scale = 100 if metric == "dice" else 1
        task_means = {t: round(scale * float(np.mean(v)), 2) for t, v in per_task.items()}
        out[metric] = {**task_means, "mean over tasks": round(float(np.mean(list(task_means.values()))), 2)}
    return out


def fmt(d: dict) -> str:
    return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] (n={d['n']})" if d["n"] > 1 else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task_batches", nargs=3, help="report folders of VerSemiTrainer_taskBatches, seeds 0 1 2")
    ap.add_argument("--nnunet-dice", nargs="*", default=[], help="report folders of the nnU-Net-Dice form, seeds 0..")
    args = ap.parse_args()
    per_seed = []
    for s, out_dir in enumerate(args.task_batches):
        cases = cases_of(os.path.join(RESULTS, f"benchmark_P20_closing_seed{s}.json"),
                         ["alone", "VerSemiTrainer_supFinish40"])
        terms = os.path.join(RESULTS, "union_terms", f"seed{s}_cases.json")
        if os.path.isfile(terms):
            cases += cases_of(terms, ["VerSemiTrainer_noUnsup"])
        cases += cases_of(os.path.join(out_dir, "results.json"), [TB])
        if s < len(args.nnunet_dice):
            cases += cases_of(os.path.join(args.nnunet_dice[s], "results.json"), [TBD])
        per_seed.append({"cases": cases})
    models = ["a", "c", "d", "taskBatches", "taskBatches_nnunetDice"]
    pairs = [("taskBatches", "a"), ("taskBatches", "d"), ("taskBatches", "c"), ("taskBatches_nnunetDice", "a"),
             ("taskBatches_nnunetDice", "taskBatches"), ("d", "a")]
    out = {"what": __doc__.split("\n\n")[0],
           "command": "python docs/results/task_batches/summarize.py " + " ".join(args.task_batches)
           + (" --nnunet-dice " + " ".join(args.nnunet_dice) if args.nnunet_dice else ""),
           "benchmark_commands": [json.load(open(os.path.join(d, "results.json")))["command"]
                                  for d in [*args.task_batches, *args.nnunet_dice]],
           "machine": "2 CPU cores, no GPU; two benchmark processes side by side with one thread each (Dice only)",
           "per_seed": [{m: means(s["cases"], m) for m in models if means(s["cases"], m)} for s in per_seed],
           "paired_differences": {}}
    for a, b in pairs:
        d = paired_difference(per_seed, a, b, TASKS)
        if d["mean over tasks"]["n"] if "mean over tasks" in d else any(v["n"] for v in d.values()):
            out["paired_differences"][f"{a} - {b}"] = d
    # Lung against per-task nnU-Net trained on Lung alone in the union's grid and in its own (../union_geometry:
    # the same draws and test cases, one run each)
    lung = {}
    for grid in ("union", "own"):
        ref = []
        for s in range(3):
            r = json.load(open(os.path.join(RESULTS, "union_geometry", f"result_Dataset98{4 + s}_Lung{s}_{grid}.json")))
            ref.append({k: v for k, v in r["dice_per_case"].items()})
        for model in ("c", "d", "taskBatches"):
            diffs = [c["dice"] - ref[s][c["case"]] for s, seed in enumerate(per_seed) for c in seed["cases"]
                     if c["method"] == model and c["task"] == "Lung" and c["case"] in ref[s]]
            lung[f"{model} - per-task nnU-Net in the {grid} grid"] = t_interval(diffs)
        lung[f"per-task nnU-Net in the {grid} grid, mean Lung Dice per seed"] = [
            round(100 * float(np.mean(list(r.values()))), 1) for r in ref]
    out["lung_against_per_task_grids"] = lung
    json.dump(out, open(os.path.join(HERE, "results.json"), "w"), indent=1)
    for s, m in enumerate(out["per_seed"]):
        print(f"seed {s}:", {k: v["dice"] for k, v in m.items()})
    for k, v in out["paired_differences"].items():
        print(k, {t: fmt(d) for t, d in v.items()})
    for k, v in out["lung_against_per_task_grids"].items():
        print("Lung:", k, fmt(v) if isinstance(v, dict) else v)


if __name__ == "__main__":
    main()
