"""Per-task nnU-Net on Lung with the union's 2d geometry against its own, over the labeled draws of run_seeds.sh:
per draw the mean test Dice of each geometry, and union - own paired over draws x test cases (95 % t interval).

Usage: python summarize.py  (in this folder, after run_seeds.sh); writes results_seeds.json
"""
import glob
import json
import os

from nnunetv2_versemi.benchmark.seeds import t_interval


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    runs = {}
    for f in sorted(glob.glob(os.path.join(here, "result_Dataset98[4-6]_Lung*_*.json"))):
        r = json.load(open(f))
        runs.setdefault(r["dataset"], {})[r["mode"]] = r["dice_per_case"]
    draws, diffs = {}, []
    for ds, modes in sorted(runs.items()):
        if set(modes) != {"union", "own"}:
            continue
        draws[ds] = {m: round(100 * sum(v.values()) / len(v), 1) for m, v in modes.items()}
        diffs += [100 * (modes["union"][c] - modes["own"][c]) for c in modes["own"]]
    out = {"what": "per-task nnU-Net (nnUNetTrainer, 2d plans of the per-task dataset, batch 4, 20 epochs x 50 "
                   "iterations, fold all, no TTA) on Lung, with its own 2d spacing/patch (1.25 mm, 40x40) and with "
                   "the union's (1.125 mm, 48x48); one labeled draw per merge seed 12345 + s, 10 test cases",
           "command": "bash docs/results/union_geometry/run_seeds.sh && python docs/results/union_geometry/summarize.py",
           "machine": "2 CPU cores, no GPU; shared with other benchmark runs (Dice only, no timing)",
           "mean_dice_per_draw": draws, "union_minus_own": t_interval(diffs)}
    json.dump(out, open(os.path.join(here, "results_seeds.json"), "w"), indent=1)
    print(json.dumps({k: out[k] for k in ("mean_dice_per_draw", "union_minus_own")}, indent=1))


if __name__ == "__main__":
    main()
