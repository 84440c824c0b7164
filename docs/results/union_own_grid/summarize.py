"""Each task at its own spacing in the union, `paper` preset at 20 % labels: labeled-only VerSemi
(`VerSemiTrainer_noUnsup`, method (c)) trained on the union of the benchmark's seed-s draw with every task preprocessed
at its own planned 2d spacing (owngrid.py: Pancreas and LA 1.0 mm, Spleen 1.5 mm, Lung 1.25 mm, the spacings of the
per-task datasets' plans) and predicted per task at that spacing, set against the same model trained in the union's
grid (1.125 mm, ../union_terms) and per-task nnU-Net (../benchmark_P20_closing_seed{s}.json; Lung also
../union_geometry). The benchmark's own predictions of the own-grid model, at the union's spacing, show what a
prediction in the wrong grid costs.

Usage: python docs/results/union_own_grid/summarize.py OUT_S0 [OUT_S1 ...] (report folders of owngrid.py's runs,
each with pred_own_grid/; nnUNet_raw set as for the runs). Writes results.json here.
"""
import json
import os
import sys

import numpy as np

from nnunetv2_versemi.benchmark.seeds import paired_difference, t_interval
from nnunetv2_versemi.evaluation.evaluate import evaluate_folders
from nnunetv2_versemi.tasktable import find_task_table

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)
TASKS = ["Pancreas", "LA", "Spleen", "Lung"]


def cases_of(results_file: str, method: str, label: str) -> list[dict]:
    return [{**c, "method": label} for c in json.load(open(results_file))["cases"] if c["method"] == method]


def own_grid_cases(out_dir: str) -> list[dict]:
    bench = json.load(open(os.path.join(out_dir, "results.json")))
    raw = os.path.join(os.environ["nnUNet_raw"], bench["dataset"])
    table = find_task_table(path=os.path.join(os.environ["nnUNet_preprocessed"], bench["dataset"], "nnUNetPlans.json"))
    ev = evaluate_folders(os.path.join(raw, "labelsTs"), os.path.join(out_dir, "pred_own_grid"), table)
    out = []
    for case, rec in ev["cases"].items():
        (m,) = rec["metrics"].values()
        out.append({"method": "c, own grids", "task": rec["task"], "case": case, "dice": m["dice"],
                    "hd95": m["hd95"], "fp_components": m["fp_components"]})
    return out


def main(dirs: list[str]) -> None:
    per_seed = []
    for s, d in enumerate(dirs):
        cases = own_grid_cases(d)
        cases += cases_of(os.path.join(d, "results.json"), "VerSemiTrainer_noUnsup", "c, own grids, predicted in the union's")
        cases += cases_of(os.path.join(RESULTS, "union_terms", f"seed{s}_cases.json"), "VerSemiTrainer_noUnsup",
                          "c, union grid")
        cases += cases_of(os.path.join(RESULTS, f"benchmark_P20_closing_seed{s}.json"), "alone", "a")
        per_seed.append({"cases": cases})
    models = ["a", "c, union grid", "c, own grids", "c, own grids, predicted in the union's"]
    means = [{m: {t: round(100 * float(np.mean([c["dice"] for c in s["cases"] if c["method"] == m and c["task"] == t])),
                           1) for t in TASKS} for m in models} for s in per_seed]
    for s in means:
        for m in s.values():
            m["mean over tasks"] = round(float(np.mean([m[t] for t in TASKS])), 1)
    pairs = [("c, own grids", "c, union grid"), ("c, own grids", "a"), ("c, union grid", "a"),
             ("c, own grids, predicted in the union's", "c, own grids")]
    out = {"what": __doc__.split("\n\n")[0], "command": "python docs/results/union_own_grid/summarize.py " + " ".join(dirs),
           "benchmark_commands": [json.load(open(os.path.join(d, "results.json")))["command"] for d in dirs],
           "machine": "2 CPU cores, no GPU; shared with other benchmark processes (Dice only)",
           "mean_dice_per_seed": means,
           "paired_differences": {f"{a} - {b}": paired_difference(per_seed, a, b, TASKS) for a, b in pairs}}
    lung = {}
    for grid in ("own", "union"):
        diffs = []
        for s, seed in enumerate(per_seed):
            ref = json.load(open(os.path.join(RESULTS, "union_geometry",
                                              f"result_Dataset98{4 + s}_Lung{s}_{grid}.json")))["dice_per_case"]
            diffs += [c["dice"] - ref[c["case"]] for c in seed["cases"]
                      if c["method"] == "c, own grids" and c["task"] == "Lung" and c["case"] in ref]
        lung[f"c, own grids - per-task nnU-Net on Lung alone in the {grid} grid"] = t_interval(diffs)
    out["lung_against_per_task_grids"] = lung
    out["cases_own_grids"] = [[{k: c[k] for k in ("task", "case", "dice", "hd95", "fp_components")}
                               for c in seed["cases"] if c["method"] == "c, own grids"] for seed in per_seed]
    json.dump(out, open(os.path.join(HERE, "results.json"), "w"), indent=1)
    for s, m in enumerate(means):
        print(f"seed {s}:", m)
    for k, v in {**out["paired_differences"]}.items():
        print(k, {t: f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" for t, d in v.items()
                  if d["n"] > 1})
    for k, d in lung.items():
        if d["n"] > 1:
            print("Lung:", k, f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] (n={d['n']})")


if __name__ == "__main__":
    main(sys.argv[1:])
