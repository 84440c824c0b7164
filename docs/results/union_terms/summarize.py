"""Which part of VerSemi costs Lung its points on the `paper` preset at 20 % labels? Labeled-only VerSemi
(`VerSemiTrainer_noUnsup`, method (c)) trained on the labeled draws of the benchmark's seeds 0-2 (unions
Dataset98{0,1,2}_PaperGeoL20S{s} of ../union_geometry/run_seeds.sh: merge seeds 12345 + s, the same labeled and
test cases as ../benchmark_P20_closing_seed{s}.json), set against that benchmark's per-task nnU-Net (a) and
default (d); on seed 0's draw also the union with L_sup alone (`VerSemiTrainer_supOnly`) and a second per-task
nnU-Net run, and Lung's predicted / reference tumour volume of the models whose predictions were kept.

Usage: python docs/results/union_terms/summarize.py OUT_S0/results.json OUT_S1/results.json OUT_S2/results.json
(OUT_S0: the run with `--methods a VerSemiTrainer_supOnly VerSemiTrainer_noUnsup` on 980; OUT_S1, OUT_S2:
`--methods VerSemiTrainer_noUnsup` on 981, 982; nnUNet_raw set as for the runs). Writes results.json here: mean
Dice per seed, task and model, and paired differences per task over seeds x test cases (95 % t intervals).
"""
import glob
import json
import os
import sys

import numpy as np
import SimpleITK as sitk

from nnunetv2_versemi.benchmark.seeds import t_interval

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)
TASKS = ["Pancreas", "LA", "Spleen", "Lung"]


def per_case(results: dict, method: str) -> dict:
    return {(c["task"], c["case"]): 100 * c["dice"] for c in results["cases"]
            if c["method"] == method and c["dice"] is not None}


def task_means(cases: dict) -> dict:
    return {t: round(float(np.mean([v for (tt, _), v in cases.items() if tt == t])), 1) for t in TASKS}


def lung_volume_ratios(terms_file: str, dataset: str) -> dict:
    """Mean over Lung's test cases of predicted / reference foreground volume, per model in predictions/."""
    labels = os.path.join(os.environ["nnUNet_raw"], dataset, "labelsTs")
    out = {}
    for model_dir in sorted(glob.glob(os.path.join(os.path.dirname(terms_file), "predictions", "*"))):
        ratios = []
        for f in sorted(glob.glob(os.path.join(model_dir, "Lung_*.nii.gz"))):
            pred = sitk.GetArrayFromImage(sitk.ReadImage(f)) > 0
            ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(labels, os.path.basename(f)))) > 0
            ratios.append(float(pred.sum() / max(1, ref.sum())))
        out[os.path.basename(model_dir)] = {"mean": round(float(np.mean(ratios)), 3), "per_case": ratios}
    return out


def paired(seeds: list[dict], a: str, b: str) -> dict:
    out = {}
    for t in TASKS:
        diffs = [s[a][k] - s[b][k] for s in seeds if a in s and b in s for k in s[a] if k[0] == t and k in s[b]]
        out[t] = t_interval(diffs)
    return out


def main(files: list[str]) -> None:
    seeds = []
    for s, f in enumerate(files):
        terms = json.load(open(f))
        bench = json.load(open(os.path.join(RESULTS, f"benchmark_P20_closing_seed{s}.json")))
        models = {"a": per_case(bench, "alone"), "c": per_case(terms, "VerSemiTrainer_noUnsup"),
                  "d": per_case(bench, "VerSemiTrainer_supFinish40")}
        if s == 0:
            models["supOnly"] = per_case(terms, "VerSemiTrainer_supOnly")
            models["a, second run"] = per_case(terms, "alone")
        seeds.append(models)
    out = {"what": __doc__.split("\n\n")[0], "command": "python docs/results/union_terms/summarize.py " + " ".join(files),
           "benchmark_commands": [json.load(open(f))["command"] for f in files],
           "machine": "2 CPU cores, no GPU; shared with other runs (Dice only)",
           "mean_dice": [{m: task_means(c) for m, c in s.items()} for s in seeds],
           "paired_differences": {"c - a": paired(seeds, "c", "a"), "d - c": paired(seeds, "d", "c"),
                                  "d - a": paired(seeds, "d", "a"),
                                  "supOnly - a, second run (seed 0)": paired(seeds, "supOnly", "a, second run"),
                                  "c - supOnly (seed 0)": paired(seeds, "c", "supOnly")},
           "lung_volume_ratio_seed0": lung_volume_ratios(files[0], json.load(open(files[0]))["dataset"])}
    json.dump(out, open(os.path.join(HERE, "results.json"), "w"), indent=1)
    for s, m in enumerate(out["mean_dice"]):
        print(f"seed {s}:", m)
    for k, v in out["paired_differences"].items():
        print(k, {t: f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" for t, d in v.items() if d["n"] > 1})
    print("Lung predicted / reference volume, seed 0:", {m: v["mean"] for m, v in out["lung_volume_ratio_seed0"].items()})


if __name__ == "__main__":
    main(sys.argv[1:])
