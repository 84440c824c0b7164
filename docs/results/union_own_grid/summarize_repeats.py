"""Several trainings of each setting on the same draws, `paper` preset at 20 % labels, 3 seeds: per-task nnU-Net (a),
the default (d, its closing-phase config `VerSemiTrainer_supFinish40`), task batches in the union's grid ("TB,
union grid"), task batches with every task at its own spacing ("TB, own grids"), and two candidates for Lung's
recall: `VerSemiTrainer_foreground67` ("fg") and `VerSemiTrainer_pseudoBalanced` ("pb"), each run on the benchmark's seed-s draw (the repeats on copies of the same unions: owngrid.py copy). Each
test case's Dice is averaged over the runs of its setting before the settings are paired, so that the training
randomness of one run, which moves Lung by up to 12 points, does not decide the comparison.

Usage (nnUNet_raw / nnUNet_preprocessed set as for the runs; every --runs gives one more run of a setting, its report
folders for seeds 0, 1, 2):
    python docs/results/union_own_grid/summarize_repeats.py \\
        --runs a outTerms outA_981 outA_982 --runs a outA_970 outA_969 outA_968 \\
        --runs tb outTBr_970 outTBr_969 outTBr_968 \\
        --runs own outOwnTB_s0 outOwnTB_s1 outOwnTB_s2 --runs own outOwnTBr_s0 outOwnTBr_s1 outOwnTBr_s2 ...
The first runs of (a), of task batches in the union's grid and of the default (d) come from the committed
reports (../benchmark_P20_closing_seed{s}.json, ../task_batches/taskBatches_seed{s}.json). Own-grid runs are scored
on their predictions at each task's spacing (pred_own_grid/, run_tb_grids.sh). For the runs given with --runs it
also measures Lung's predicted / reference tumour volume per test case, and the first epoch whose online pseudo Dice of
Lung reaches 0.5. Writes results_repeats.json and
repeats.png here.
"""
import argparse
import json
import os

import numpy as np
from summarize_tb import RESULTS, TASKS, cases_of, grid_cases, load

from nnunetv2_versemi.benchmark.seeds import paired_difference

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"a": "a", "tb": "TB, union grid", "own": "TB, own grids", "d": "d", "fg": "foreground67",
            "pb": "pseudoBalanced"}
LEGEND = {"a": "(a) per-task nnU-Net", "tb": "task batches, union's grid", "own": "task batches, own grids",
          "d": "(d) the default (union's grid)", "fg": "foreground_oversampling 0.67",
          "pb": "class-balanced L_pseudo"}
METHOD_IN_REPORT = {"a": "alone", "tb": "VerSemiTrainer_taskBatches", "d": "VerSemiTrainer_supFinish40",
                    "fg": "VerSemiTrainer_foreground67", "pb": "VerSemiTrainer_pseudoBalanced"}
KEYS = ("dice", "hd95", "fp_components")


def committed_runs(seed: int) -> dict[str, list[dict]]:
    closing = os.path.join(RESULTS, f"benchmark_P20_closing_seed{seed}.json")
    tb = os.path.join(RESULTS, "task_batches", f"taskBatches_seed{seed}.json")
    return {"a": cases_of(closing, "alone", "a"), "tb": cases_of(tb, "VerSemiTrainer_taskBatches", "tb"),
            "d": cases_of(closing, "VerSemiTrainer_supFinish40", "d")}


def run_cases(setting: str, out_dir: str) -> list[dict]:
    if setting == "own":
        return grid_cases(out_dir, "own")
    return cases_of(os.path.join(out_dir, "results.json"), METHOD_IN_REPORT[setting], setting)


def lung_volume_ratio(setting: str, out_dir: str) -> float:
    """Mean over Lung's test cases of predicted / reference tumour volume (where Lung's Dice goes: under-segmentation)."""
    import SimpleITK as sitk

    from nnunetv2_versemi.tasktable import find_task_table
    dataset = load(os.path.join(out_dir, "results.json"))["dataset"]
    table = find_task_table(path=os.path.join(os.environ["nnUNet_preprocessed"], dataset, "nnUNetPlans.json"))
    values = table.tasks[table.index("Lung")].merged_values
    pred = os.path.join(out_dir, "pred_own_grid" if setting == "own" else f"predictions/{METHOD_IN_REPORT[setting]}")
    labels = os.path.join(os.environ["nnUNet_raw"], dataset, "labelsTs")
    ratios = []
    for f in sorted(x for x in os.listdir(labels) if x.startswith("Lung_") and x.endswith(".nii.gz")):
        p = np.isin(sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred, f))), values).sum()
        g = np.isin(sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(labels, f))), values).sum()
        ratios.append(p / max(g, 1))
    return round(float(np.mean(ratios)), 2)


def lung_take_off(out_dir: str, level: float = 0.5) -> int | str | None:
    """The first epoch whose online pseudo Dice of Lung reaches ``level`` (the union model's per-task curve, or (a)'s
    Lung model); None when it never does, "no curve" for a report written before per-task curves were recorded."""
    for run, folds in load(os.path.join(out_dir, "results.json"))["curves"].items():
        curve = folds["all"]
        values = curve["pseudo_dice_per_task"]["Lung"] if "pseudo_dice_per_task" in curve else (
            curve["pseudo_dice"] if run.endswith("-Lung") else None)
        if values is not None:
            return next((e for e, v in enumerate(values) if v is not None and v >= level), None)
    return "no curve"


def mean_over_runs(runs: list[list[dict]], label: str) -> list[dict]:
    """Each test case's mean of Dice, HD95 and false-positive components over the runs of one setting."""
    by_case = [{c["case"]: c for c in run} for run in runs]
    out = []
    for case, first in by_case[0].items():
        recs = [r[case] for r in by_case]
        mean = {k: (None if any(r[k] is None for r in recs) else float(np.mean([r[k] for r in recs]))) for k in KEYS}
        out.append({"method": label, "task": first["task"], "case": case, **mean})
    return out


def task_means(cases: list[dict]) -> dict[str, float]:
    m = {t: round(100 * float(np.mean([c["dice"] for c in cases if c["task"] == t])), 1) for t in TASKS}
    m["mean over tasks"] = round(float(np.mean([m[t] for t in TASKS])), 1)
    return m


def plot(per_run_means: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = TASKS + ["mean over tasks"]
    colours = {"a": "tab:blue", "tb": "tab:orange", "own": "tab:green", "d": "tab:red", "fg": "tab:purple",
               "pb": "tab:brown"}
    shown = [k for k in SETTINGS if any(seed.get(k) for seed in per_run_means)]
    width = 0.8 / len(shown)
    fig, axes = plt.subplots(1, len(per_run_means), figsize=(5 * len(per_run_means), 4), sharey=True)
    for s, (ax, seed) in enumerate(zip(np.atleast_1d(axes), per_run_means)):
        for j, setting in enumerate(shown):
            for run in seed.get(setting, []):
                x = np.arange(len(cols)) + (j - (len(shown) - 1) / 2) * width
                ax.scatter(x, [run[c] for c in cols], color=colours[setting], s=18,
                           label=LEGEND[setting] if run is seed[setting][0] else None)
            if seed.get(setting):
                x = np.arange(len(cols)) + (j - (len(shown) - 1) / 2) * width
                ax.hlines([np.mean([r[c] for r in seed[setting]]) for c in cols], x - width / 2, x + width / 2,
                          color=colours[setting], lw=2)
        ax.set_xticks(range(len(cols)), [c.replace("mean over tasks", "mean") for c in cols])
        ax.set_title(f"seed {s}: one dot per training run, bar = mean over runs")
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test Dice (%), mean over 10 test cases")
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(extra: list[list[str]]) -> None:
    n_seeds = 3
    runs = [{k: [v] for k, v in committed_runs(s).items()} for s in range(n_seeds)]
    commands = []
    volumes = [{} for _ in range(n_seeds)]
    take_off = [{} for _ in range(n_seeds)]
    for setting, *dirs in extra:
        if setting not in SETTINGS:
            raise SystemExit(f"--runs: unknown setting {setting!r} ({', '.join(SETTINGS)})")
        if len(dirs) != n_seeds:
            raise SystemExit(f"--runs {setting}: {n_seeds} report folders (seeds 0-{n_seeds - 1}) expected, got {len(dirs)}")
        for s, d in enumerate(dirs):
            runs[s].setdefault(setting, []).append(run_cases(setting, d))
            volumes[s].setdefault(SETTINGS[setting], []).append(lung_volume_ratio(setting, d))
            take_off[s].setdefault(SETTINGS[setting], []).append(lung_take_off(d))
            commands.append(load(os.path.join(d, "results.json"))["command"])
    per_seed, per_run_means = [], []
    for seed in runs:
        per_run_means.append({k: [task_means(r) for r in v] for k, v in seed.items()})
        per_seed.append({"cases": [c for k, v in seed.items() for c in mean_over_runs(v, SETTINGS[k])]})
    pairs = [("TB, own grids", "a"), ("TB, union grid", "a"), ("d", "a"), ("TB, own grids", "TB, union grid"),
             ("TB, own grids", "d"), ("foreground67", "a"), ("foreground67", "d"), ("pseudoBalanced", "a"),
             ("pseudoBalanced", "d")]
    present = [{c["method"] for c in seed["cases"]} for seed in per_seed]
    pairs = [p for p in pairs if all(set(p) <= m for m in present)]
    n_runs = {SETTINGS[k]: [len(seed.get(k, [])) for seed in runs] for k in SETTINGS}
    spread = {SETTINGS[k]: [round(float(np.std([r["mean over tasks"] for r in seed[k]], ddof=1)), 1)
                            if len(seed.get(k, [])) > 1 else None for seed in per_run_means] for k in SETTINGS}
    lung_spread = {SETTINGS[k]: [round(float(np.std([r["Lung"] for r in seed[k]], ddof=1)), 1)
                                 if len(seed.get(k, [])) > 1 else None for seed in per_run_means] for k in SETTINGS}
    out = {"what": __doc__.split("\n\n")[0],
           "command": "python docs/results/union_own_grid/summarize_repeats.py "
                      + " ".join("--runs " + " ".join(r) for r in extra),
           "benchmark_commands": commands,
           "machine": "2 CPU cores, no GPU; two benchmark processes side by side (Dice only)",
           "runs_per_seed": n_runs,
           "mean_dice_per_seed_and_run": [{SETTINGS[k]: v for k, v in seed.items()} for seed in per_run_means],
           "mean_dice_per_seed_mean_over_runs": [{k: task_means([c for c in seed["cases"] if c["method"] == k])
                                                  for k in SETTINGS.values()} for seed in per_seed],
           "std_between_runs_mean_over_tasks": spread,
           "std_between_runs_lung": lung_spread,
           "lung_predicted_over_reference_volume_per_seed_and_run": volumes,
           "lung_first_epoch_with_pseudo_dice_0.5_per_seed_and_run": take_off,
           "paired_differences_of_run_means": {f"{a} - {b}": paired_difference(per_seed, a, b, TASKS) for a, b in pairs},
           "cases_per_run": [{SETTINGS[k]: [[{f: c[f] for f in ("task", "case", *KEYS)} for c in r] for r in v]
                              for k, v in seed.items()} for seed in runs]}
    with open(os.path.join(HERE, "results_repeats.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(per_run_means, os.path.join(HERE, "repeats.png"))
    print("runs per seed:", n_runs)
    for s, m in enumerate(out["mean_dice_per_seed_mean_over_runs"]):
        print(f"seed {s}:", {k: v["mean over tasks"] for k, v in m.items()})
    print("std between runs, mean over tasks:", spread)
    print("std between runs, Lung:", lung_spread)
    print("Lung predicted / reference volume (the runs given with --runs):", volumes)
    print("Lung's first epoch with pseudo Dice >= 0.5 (the runs given with --runs):", take_off)
    for k, v in out["paired_differences_of_run_means"].items():
        print(k, {t: f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" for t, d in v.items()
                  if d["n"] > 1})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--runs", nargs="+", action="append", default=[], metavar="SETTING OUT_S0 OUT_S1 OUT_S2")
    main(p.parse_args().runs)
