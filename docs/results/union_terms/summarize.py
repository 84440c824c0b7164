"""Which part of VerSemi costs Lung its points on the `paper` preset at 20 % labels? One labeled draw (merge seed
12345, the benchmark's seed 0; union Dataset980_PaperGeoL20S0 of ../union_geometry/run_seeds.sh), 10 test cases
per task, per-case Dice of every model trained on that draw:

  alone      per-task nnU-Net (a), this run (outTerms)
  supOnly    VerSemiTrainer_supOnly: the union with prompts and L_sup alone (no CutMix terms, no unlabeled images)
  noUnsup    VerSemiTrainer_noUnsup: labeled-only VerSemi (L_sup, L_syn, L_spec), method (c)
  default    the default (d), from ../benchmark_P20_closing_seed0.json (same labeled cases and test cases)
  nnunetDice VerSemiTrainer_nnunetDice, from ../benchmark_P20_nnunetDice_seed0.json

Seed 1's draw (union Dataset981_PaperGeoL20S1, merge seed 12346): labeled-only VerSemi (OUT_TERMS_S1) against
the default and per-task nnU-Net of ../benchmark_P20_closing_seed1.json (same labeled and test cases).

Usage: python docs/results/union_terms/summarize.py OUT_TERMS/results.json OUT_TERMS_S1/results.json
(nnUNet_raw set as for the runs)
writes docs/results/union_terms/results.json (mean Dice per task and model, paired differences per task with
95 % t intervals over the 10 test cases, and the predicted / reference Lung tumour volume of the models whose
predictions OUT_TERMS/predictions holds).
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


def per_case(results: dict, method: str) -> dict:
    return {(c["task"], c["case"]): 100 * c["dice"] for c in results["cases"]
            if c["method"] == method and c["dice"] is not None}


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


def seed1(terms_file: str) -> dict:
    """Seed 1's draw: per-task nnU-Net, labeled-only VerSemi and the default; default - labeled-only per task."""
    terms = json.load(open(terms_file))
    bench = json.load(open(os.path.join(RESULTS, "benchmark_P20_closing_seed1.json")))
    models = {"alone": per_case(bench, "alone"), "noUnsup": per_case(terms, "VerSemiTrainer_noUnsup"),
              "default": per_case(bench, "VerSemiTrainer_supFinish40")}
    tasks = sorted({t for t, _ in models["alone"]})
    mean = {m: {t: round(sum(v for (tt, _), v in d.items() if tt == t) / max(1, sum(tt == t for tt, _ in d)), 1)
                for t in tasks} for m, d in models.items()}
    diff = {t: t_interval([models["default"][k] - models["noUnsup"][k] for k in models["noUnsup"]
                           if k[0] == t and k in models["default"]]) for t in tasks}
    return {"benchmark_command": terms["command"], "mean_dice": mean, "default - noUnsup": diff,
            "cases": models}


def main(terms_file: str, terms_file_s1: str) -> None:
    terms = json.load(open(terms_file))
    default = json.load(open(os.path.join(RESULTS, "benchmark_P20_closing_seed0.json")))
    dice = json.load(open(os.path.join(RESULTS, "benchmark_P20_nnunetDice_seed0.json")))
    models = {"alone": per_case(terms, "alone"),
              "supOnly": per_case(terms, "VerSemiTrainer_supOnly"),
              "noUnsup": per_case(terms, "VerSemiTrainer_noUnsup"),
              "default": per_case(default, "VerSemiTrainer_supFinish40"),
              "nnunetDice": per_case(dice, "VerSemiTrainer_nnunetDice")}
    tasks = sorted({t for t, _ in models["alone"]})
    mean = {m: {t: round(sum(v for (tt, _), v in d.items() if tt == t) / max(1, sum(tt == t for tt, _ in d)), 1)
                for t in tasks} for m, d in models.items()}
    pairs = [("supOnly", "alone"), ("noUnsup", "supOnly"), ("default", "noUnsup"), ("default", "alone")]
    diffs = {f"{a} - {b}": {t: t_interval([models[a][k] - models[b][k] for k in models[a]
                                           if k in models[b] and k[0] == t]) for t in tasks}
             for a, b in pairs}
    out = {"what": __doc__.split("\n\n")[0], "command": f"python docs/results/union_terms/summarize.py {terms_file}",
           "benchmark_command": terms["command"], "machine": "2 CPU cores, no GPU; shared with other runs (Dice only)",
           "mean_dice": mean, "paired_differences": diffs,
           "lung_volume_ratio": lung_volume_ratios(terms_file, terms["dataset"])}
    s1 = seed1(terms_file_s1)
    both = {t: t_interval([s1["cases"]["default"][k] - s1["cases"]["noUnsup"][k] for k in s1["cases"]["noUnsup"]
                           if k[0] == t and k in s1["cases"]["default"]]
                          + [models["default"][k] - models["noUnsup"][k] for k in models["noUnsup"]
                             if k[0] == t and k in models["default"]]) for t in tasks}
    out["seed1"] = {k: v for k, v in s1.items() if k != "cases"}
    out["default - noUnsup, seeds 0-1"] = both
    out["command"] = f"python docs/results/union_terms/summarize.py {terms_file} {terms_file_s1}"
    json.dump(out, open(os.path.join(HERE, "results.json"), "w"), indent=1)
    print("| model | " + " | ".join(tasks) + " |")
    for m in models:
        print(f"| {m} | " + " | ".join(f"{mean[m][t]:.1f}" for t in tasks) + " |")
    for k, v in diffs.items():
        print(k, {t: f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" for t, d in v.items() if d["n"] > 1})
    print("Lung predicted / reference volume:", {m: v["mean"] for m, v in out["lung_volume_ratio"].items()})
    print("seed 1:", s1["mean_dice"])
    for name in ("default - noUnsup, seeds 0-1",):
        print(name, {t: f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" for t, d in out[name].items()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
