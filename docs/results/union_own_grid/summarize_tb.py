"""Task batches (`VerSemiTrainer_taskBatches`, every unlabeled term on) with the tasks at their own spacings, `paper`
preset at 20 % labels, 3 seeds: owngrid.py's unions of the benchmark's seed-s draw, with the labeled AND unlabeled
images of every task at its own planned 2d spacing ("own") or with Lung alone at its own spacing and the other tasks
in the union's grid ("lung"), each task predicted at its spacing. Set against task batches in the union's grid
(../task_batches), the default (../benchmark_P20_closing_seed{s}.json) and per-task nnU-Net (a) of the same draws.

Usage: python docs/results/union_own_grid/summarize_tb.py --own OWN_S0 OWN_S1 OWN_S2 --lung LUNG_S0 LUNG_S1 LUNG_S2
[--own-repeat REP_S0 REP_S1 REP_S2] (report folders of run_tb_grids.sh, each with pred_own_grid/; nnUNet_raw and
nnUNet_preprocessed set as for the runs). The repeats are second runs of the own-grids setting on copies of the same
unions; "own grids, 2 runs" is each test case's mean over both runs. Writes results_tb.json here.
"""
import argparse
import json
import os

import numpy as np

from nnunetv2_versemi.benchmark.seeds import paired_difference
from nnunetv2_versemi.evaluation.evaluate import evaluate_folders
from nnunetv2_versemi.tasktable import find_task_table

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)
TASKS = ["Pancreas", "LA", "Spleen", "Lung"]


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def cases_of(results_file: str, method: str, label: str) -> list[dict]:
    return [{**c, "method": label} for c in load(results_file)["cases"] if c["method"] == method]


def grid_cases(out_dir: str, label: str) -> list[dict]:
    """Test cases predicted at each task's spacing (owngrid.py predict), scored against the raw test labels."""
    dataset = load(os.path.join(out_dir, "results.json"))["dataset"]
    table = find_task_table(path=os.path.join(os.environ["nnUNet_preprocessed"], dataset, "nnUNetPlans.json"))
    ev = evaluate_folders(os.path.join(os.environ["nnUNet_raw"], dataset, "labelsTs"),
                          os.path.join(out_dir, "pred_own_grid"), table)
    out = []
    for case, rec in ev["cases"].items():
        (m,) = rec["metrics"].values()
        out.append({"method": label, "task": rec["task"], "case": case, "dice": m["dice"], "hd95": m["hd95"],
                    "fp_components": m["fp_components"]})
    return out


def mean_of_runs(first: list[dict], second: list[dict], label: str) -> list[dict]:
    """Each test case's mean Dice, HD95 and false-positive components over two runs."""
    other = {c["case"]: c for c in second}
    out = []
    for c in first:
        d = other[c["case"]]
        both = {k: (None if c[k] is None or d[k] is None else (c[k] + d[k]) / 2)
                for k in ("dice", "hd95", "fp_components")}
        out.append({**c, **both, "method": label})
    return out


def main(own: list[str], lung: list[str], repeat: list[str]) -> None:
    per_seed = []
    for s, (own_dir, lung_dir) in enumerate(zip(own, lung)):
        first = grid_cases(own_dir, "TB, own grids")
        cases = first + grid_cases(lung_dir, "TB, Lung's own grid")
        if repeat:
            second = grid_cases(repeat[s], "TB, own grids, repeat")
            cases += second + mean_of_runs(first, second, "TB, own grids, 2 runs")
        cases += cases_of(os.path.join(RESULTS, "task_batches", f"taskBatches_seed{s}.json"),
                          "VerSemiTrainer_taskBatches", "TB, union grid")
        closing = os.path.join(RESULTS, f"benchmark_P20_closing_seed{s}.json")
        cases += cases_of(closing, "alone", "a") + cases_of(closing, "VerSemiTrainer_supFinish40", "d")
        per_seed.append({"cases": cases})
    models = ["a", "d", "TB, union grid", "TB, own grids", "TB, Lung's own grid"]
    if repeat:
        models += ["TB, own grids, repeat", "TB, own grids, 2 runs"]
    means = []
    for seed in per_seed:
        m = {k: {t: round(100 * float(np.mean([c["dice"] for c in seed["cases"] if c["method"] == k and c["task"] == t])),
                          1) for t in TASKS} for k in models}
        for v in m.values():
            v["mean over tasks"] = round(float(np.mean([v[t] for t in TASKS])), 1)
        means.append(m)
    pairs = [(g, ref) for g in ("TB, own grids", "TB, Lung's own grid") for ref in ("a", "TB, union grid", "d")]
    pairs += [("TB, own grids", "TB, Lung's own grid"), ("TB, union grid", "a")]
    if repeat:
        pairs += [(g, ref) for g in ("TB, own grids, repeat", "TB, own grids, 2 runs") for ref in ("a", "TB, union grid")]
        pairs += [("TB, own grids, repeat", "TB, own grids")]
    out = {"what": __doc__.split("\n\n")[0],
           "command": "python docs/results/union_own_grid/summarize_tb.py --own " + " ".join(own) + " --lung "
                      + " ".join(lung) + (" --own-repeat " + " ".join(repeat) if repeat else ""),
           "benchmark_commands": [load(os.path.join(d, "results.json"))["command"] for d in [*own, *lung, *repeat]],
           "machine": "2 CPU cores, no GPU; shared with other benchmark processes (Dice only)",
           "mean_dice_per_seed": means,
           "paired_differences": {f"{a} - {b}": paired_difference(per_seed, a, b, TASKS) for a, b in pairs},
           "cases": [[{k: c[k] for k in ("method", "task", "case", "dice", "hd95", "fp_components")}
                      for c in seed["cases"] if c["method"].startswith(("TB, own grids", "TB, Lung's own grid"))]
                     for seed in per_seed]}
    with open(os.path.join(HERE, "results_tb.json"), "w") as f:
        json.dump(out, f, indent=1)
    for s, m in enumerate(means):
        print(f"seed {s}:", {k: v["mean over tasks"] for k, v in m.items()})
        for k, v in m.items():
            print("   ", k, v)
    for k, v in out["paired_differences"].items():
        print(k, {t: f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" for t, d in v.items()
                  if d["n"] > 1})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--own", nargs="+", required=True)
    p.add_argument("--lung", nargs="+", required=True)
    p.add_argument("--own-repeat", nargs="+", default=[])
    a = p.parse_args()
    main(a.own, a.lung, a.own_repeat)
