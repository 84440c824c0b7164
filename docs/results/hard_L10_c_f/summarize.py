"""The `hard` preset at 10 % labels, 3 seeds, with today's default (the closing phase): labeled-only VerSemi (c)
and per-task nnU-Net with the present-class Dice (f) trained on every seed's union (the same labeled and test cases
as ../benchmark_hard_L10_closing_seed{s}.json), set against that benchmark's per-task nnU-Net (a) and default (d),
and against nnU-Net with pseudo labels (e) of the runs before the closing phase (../benchmark_hard_L10_seed{s}.json:
the same draws and test cases; (e) does not depend on VerSemi's code).

Usage: python docs/results/hard_L10_c_f/summarize.py OUT/L10/seed0 OUT/L10/seed1 OUT/L10/seed2 (the report folders of
`python docs/results/scripts/hard_campaign.py OUT --settings L10 --seeds 3 --per-task-methods f --union-methods c`).
Writes results.json here: mean Dice, HD95 and false-positive components per seed, task and method, and paired
differences per task and over all tasks (seeds x test cases, 95 % t intervals).
"""
import json
import os
import sys

import numpy as np

from nnunetv2_versemi.benchmark.seeds import paired_difference

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)
TASKS = ["HardOrganCT", "HardKidneyCT", "HardProstateMR"]
LABELS = {"alone": "a", "VerSemiTrainer_supFinish40": "d", "noUnsup": "c", "alonePCD": "f", "pseudo": "e"}


def cases_of(results_file: str, methods: list[str]) -> list[dict]:
    return [{**c, "method": LABELS[c["method"]]} for c in json.load(open(results_file))["cases"]
            if c["method"] in methods]


def means(cases: list[dict], model: str) -> dict:
    out = {}
    for metric, scale in (("dice", 100), ("hd95", 1), ("fp_components", 1)):
        per_task = {t: [c[metric] for c in cases if c["method"] == model and c["task"] == t and c[metric] is not None]
                    for t in TASKS}
        if all(per_task.values()):
            m = {t: round(scale * float(np.mean(v)), 2) for t, v in per_task.items()}
            out[metric] = {**m, "mean over tasks": round(float(np.mean(list(m.values()))), 2)}
    return out


def main(dirs: list[str]) -> None:
    per_seed = []
    for s, d in enumerate(dirs):
        cases = cases_of(os.path.join(RESULTS, f"benchmark_hard_L10_closing_seed{s}.json"),
                         ["alone", "VerSemiTrainer_supFinish40"])
        cases += cases_of(os.path.join(d, "results.json"), ["noUnsup", "alonePCD"])
        cases += cases_of(os.path.join(RESULTS, f"benchmark_hard_L10_seed{s}.json"), ["pseudo"])
        per_seed.append({"cases": cases})
    models = ["a", "c", "d", "e", "f"]
    out = {"what": __doc__.split("\n\n")[0], "command": "python docs/results/hard_L10_c_f/summarize.py " + " ".join(dirs),
           "benchmark_commands": [json.load(open(os.path.join(d, "results.json")))["command"] for d in dirs],
           "machine": "2 CPU cores, no GPU; shared with other benchmark processes (Dice only)",
           "per_seed": [{m: means(s["cases"], m) for m in models if means(s["cases"], m)} for s in per_seed],
           "paired_differences": {f"{a} - {b}": paired_difference(per_seed, a, b, TASKS)
                                  for a, b in (("c", "a"), ("d", "c"), ("d", "a"), ("f", "a"), ("d", "f"),
                                                                    ("e", "a"), ("d", "e"))}}
    json.dump(out, open(os.path.join(HERE, "results.json"), "w"), indent=1)
    for s, m in enumerate(out["per_seed"]):
        print(f"seed {s}:", {k: v["dice"] for k, v in m.items()})
    for k, v in out["paired_differences"].items():
        print(k, {t: f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] (n={d['n']})"
                  for t, d in v.items() if d["n"] > 1})


if __name__ == "__main__":
    main(sys.argv[1:])
