"""The benchmark over several seeds (``nnUNetv2_versemi_benchmark --seeds N``).

Seed 0 is the union as given. Seed s > 0 re-draws the labeled subset: the union's sources are merged again with
the union's recorded merge arguments (``versemi_merge`` in its dataset.json) and merge seed + s, into a dataset
named ``<union name>S<s>`` under the first free id, which is planned and preprocessed with
:func:`nnunetv2_versemi.data.preprocess.plan_and_preprocess`. Every trained model also draws its own training
randomness (nnU-Net seeds nothing). Each seed is one ordinary benchmark (its report in ``<out>/seed<s>``, resumed
like any benchmark); :func:`aggregate` then summarises them:

- per method and task: mean ± std over seeds of the seed's mean test Dice;
- per method and task: the paired difference to (a), Dice(method) - Dice(a) on the same test case of the same
  seed, with a 95 % t-interval over all (seed, test case) pairs. Pairs of one seed share a model, so the
  interval is narrower than one over independent seeds would be; the per-seed means are listed beside it;
- per method: learning curves (nnU-Net's online pseudo Dice against optimizer steps) of every seed;
- collapse: every (method, task, seed) whose test cases all have Dice 0.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from os.path import isfile, join

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from scipy import stats

from nnunetv2_versemi.benchmark import report
from nnunetv2_versemi.benchmark.comparison import run_benchmark
from nnunetv2_versemi.benchmark.methods import BASELINE, BenchmarkError
from nnunetv2_versemi.benchmark.preparation import apply_preset, base_configuration, prepare_benchmark
from nnunetv2_versemi.data.merge import MergeError, merge_datasets
from nnunetv2_versemi.data.preprocess import plan_and_preprocess
from nnunetv2_versemi.discovery import ensure_ext_trainer_env
from nnunetv2_versemi.names import dataset_folder_name
from nnunetv2_versemi.nnunet_paths import dataset_id, free_dataset_id
from nnunetv2_versemi.tasktable import TABLE_KEY, TaskTable

SEED_MARK = "versemi_benchmark_seed"
SEEDS_JSON = "seeds.json"
SEEDS_MD = "seeds.md"
SEEDS_CURVES_PNG = "seeds_learning_curves.png"


def seed_union(union: str, seed_index: int, configuration: str, plans_preset: str | None, npp: int,
               claimed: set[int], log=print, new_id: int | None = None) -> str:
    """Name of the union of ``seed_index`` (0: ``union`` itself), merged, planned and preprocessed if needed;
    a new one gets ``new_id`` (default: the first free id after the union's), so that benchmarks of several
    seeds can run side by side with id ranges of their own."""

    if seed_index == 0:
        return union
    raw_root = os.environ["nnUNet_raw"]
    dj = load_json(join(raw_root, union, "dataset.json"))
    prov = dj.get("versemi_merge")
    if not prov or not prov.get("sources"):
        raise BenchmarkError(f"{union}/dataset.json records no merge arguments ('versemi_merge'): --seeds needs a "
                             "union written by nnUNetv2_versemi_merge")
    table = TaskTable.from_dataset_json(dj)
    union_id = dataset_id(union)
    suffix = f"{union.split('_', 1)[1]}S{seed_index}"
    mark = {"union": union, "merge_seed": int(prov["seed"]) + seed_index}
    name = next((d for d in sorted(os.listdir(raw_root)) if re.fullmatch(r"Dataset\d{3}_" + re.escape(suffix), d)),
                None)
    if name is not None:
        found = load_json(join(raw_root, name, "dataset.json")) if isfile(join(raw_root, name, "dataset.json")) else {}
        if found.get(SEED_MARK) != mark:
            raise BenchmarkError(f"{join(raw_root, name)} exists but is not the benchmark's seed {seed_index} union "
                                 f"of {union}; remove or rename it")
    else:
        name = dataset_folder_name(new_id if new_id is not None else free_dataset_id(union_id, claimed), suffix)
        log(f"Seed {seed_index}: merging {', '.join(prov['sources'])} again with merge seed {mark['merge_seed']} "
            f"into {name}")
        try:
            folder = merge_datasets(
                prov["sources"], dataset_id(name), suffix,
                task_names=[t.name for t in table.tasks], labeled_fraction=prov.get("labeled_fraction"),
                labeled_cases=prov.get("labeled_cases"), seed=mark["merge_seed"],
                test_fraction=prov.get("test_fraction"),
                channels={t.name: t.channel for t in table.tasks if t.channel is not None},
                num_processes=max(1, npp), progress=False)
        except MergeError as e:
            raise BenchmarkError(f"Seed {seed_index}: merging the sources of {union} again failed: {e}") from e
        new = load_json(join(folder, "dataset.json"))
        new[SEED_MARK] = mark
        save_json(new, join(folder, "dataset.json"), sort_keys=False)
    plans_file = join(os.environ["nnUNet_preprocessed"], name, "nnUNetPlans.json")
    if not isfile(plans_file) or TABLE_KEY not in load_json(plans_file):

        union_plans = load_json(join(os.environ["nnUNet_preprocessed"], union, "nnUNetPlans.json"))
        base = base_configuration(apply_preset(union_plans, plans_preset), configuration)
        log(f"Seed {seed_index}: planning and preprocessing {name} ({base})")
        plan_and_preprocess(name, [base], num_processes=[max(1, npp)], num_processes_fingerprint=max(1, npp),
                            progress=False)
    return name


def run_seeds(args) -> dict:
    """``args.seeds`` benchmarks (see the module docstring); returns the aggregate written to seeds.json."""

    ensure_ext_trainer_env()
    if args.p != "nnUNetPlans":
        # the seed unions are planned by the package's plan-and-preprocess, which writes nnU-Net's default plans
        raise BenchmarkError(f"--seeds works with the default plans (-p nnUNetPlans), got -p {args.p}; apply "
                             "changes to the plans with --plans-preset instead")
    ctx = prepare_benchmark(args)  # every check on the given union before anything is written
    union = ctx.union
    out = os.path.abspath(args.o or join(os.environ["nnUNet_results"], union,
                                         f"benchmark_seeds__{ctx.bench_plans}__{args.c}"))
    os.makedirs(out, exist_ok=True)
    claimed: set[int] = set()
    unions = [seed_union(union, s, args.c, args.plans_preset, args.npp, claimed, ctx.log)
              for s in range(args.seeds)]
    per_seed = []
    for s, name in enumerate(unions):
        a = copy.copy(args)
        a.d, a.o, a.seeds = name, join(out, f"seed{s}"), 1
        ctx.log(f"Seed {s}: benchmark on {name}")
        per_seed.append(run_benchmark(a))
    agg = aggregate(per_seed, unions)
    agg["command"] = " ".join(["nnUNetv2_versemi_benchmark", *(getattr(args, "argv", None) or [])])
    write_seed_report(out, agg, per_seed)
    ctx.log(f"Wrote {SEEDS_JSON}, {SEEDS_MD}, {SEEDS_CURVES_PNG} to {out}")
    return agg


# ---- aggregation --------------------------------------------------------------------------------------------
def t_interval(values: list[float], level: float = 0.95) -> dict:
    """Mean and two-sided t confidence interval of ``values``."""

    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], float)
    n = int(arr.size)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(arr.mean())
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * arr.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def _mean_std(values: list[float]) -> dict:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], float)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "n": int(arr.size), "values": [float(v) for v in arr]}


def paired_difference(per_seed: list[dict], method: str, reference: str, tasks: list[str]) -> dict:
    """Per task (and over all tasks): :func:`t_interval` of Dice(method) - Dice(reference) over the (seed, test
    case) pairs scored for both."""
    diffs: dict[str, list[float]] = {t: [] for t in [*tasks, report.MEAN_ROW]}
    for r in per_seed:
        ref = {(c["task"], c["case"]): c["dice"] for c in r["cases"] if c["method"] == reference}
        for c in r["cases"]:
            b = ref.get((c["task"], c["case"]))
            if c["method"] != method or b is None or c["dice"] is None or c["task"] not in diffs:
                continue
            diffs[c["task"]].append(c["dice"] - b)
            diffs[report.MEAN_ROW].append(c["dice"] - b)
    return {t: t_interval(v) for t, v in diffs.items()}


def aggregate(per_seed: list[dict], unions: list[str]) -> dict:
    """Summary over seeds of :func:`report.collect` results (see the module docstring)."""
    methods = per_seed[0]["methods"]
    tasks = per_seed[0]["tasks"]
    rows = [*tasks, report.MEAN_ROW]
    summary, paired, collapsed = {}, {}, []
    others: dict[str, dict] = {"hd95": {}, "fp_components": {}}
    for m in methods:
        key = m["key"]
        summary[key] = {t: _mean_std([r["summary"][key][t]["dice"]["mean"] for r in per_seed]) for t in rows}
        for metric in ("hd95", "fp_components"):
            others[metric][key] = {t: _mean_std([(r["summary"][key][t].get(metric) or {}).get("mean")
                                                 for r in per_seed]) for t in rows}
        for s, r in enumerate(per_seed):
            for t in tasks:
                dice = [c["dice"] for c in r["cases"] if c["method"] == key and c["task"] == t]
                if dice and all(d == 0 for d in dice):
                    collapsed.append({"method": key, "task": t, "seed": s})
        if key != BASELINE:
            diff = paired_difference(per_seed, key, BASELINE, tasks)
            if diff[report.MEAN_ROW]["n"]:
                paired[key] = diff
    keys = [m["key"] for m in methods]
    between = [{"method": keys[j], "reference": keys[i], "difference": paired_difference(per_seed, keys[j], keys[i],
                                                                                         tasks)}
               for i in range(len(keys)) for j in range(i + 1, len(keys))]
    curves = {m["key"]: [] for m in methods}
    for s, r in enumerate(per_seed):
        for st in r["runs"]:
            for fold, c in (r["curves"].get(st["run"]) or {}).items():
                if isinstance(c, dict) and "steps" in c:
                    curves.setdefault(st["method"], []).append(
                        {"seed": s, "task": st.get("task"), "fold": fold, "steps": c["steps"],
                         "pseudo_dice": c["pseudo_dice"], "switch_step": c.get("switch_step")})
    return report.nan_to_none({
        "unions": unions,
        "seeds": len(per_seed),
        "methods": methods,
        "baseline": BASELINE,
        "tasks": tasks,
        "configuration": per_seed[0]["configuration"],
        "budget": per_seed[0]["budget"],
        "budget_per": per_seed[0]["budget_per"],
        "folds": per_seed[0]["folds"],
        "machine": per_seed[0]["machine"],
        "test_cases": [r["test_cases"] for r in per_seed],
        "dice_over_seeds": summary,
        "hd95_over_seeds": others["hd95"],
        "fp_components_over_seeds": others["fp_components"],
        "paired_difference_to_baseline": paired,
        "paired_differences": between,
        "collapsed": collapsed,
        "curves": curves,
    })


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _plain(s: dict, digits: int) -> str:
    return "n/a" if s["mean"] is None else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _ci(ci: dict) -> str:
    if ci["mean"] is None:
        return "n/a"
    if ci["low"] is None:
        return f"{100 * ci['mean']:+.1f} (n={ci['n']})"
    return f"{100 * ci['mean']:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}] (n={ci['n']})"


def seeds_markdown(agg: dict) -> str:
    methods, rows = agg["methods"], [*agg["tasks"], report.MEAN_ROW]
    b = agg["budget"]
    base_label = next((m["label"] for m in methods if m["key"] == agg["baseline"]), agg["baseline"])
    lines = [
        f"# VerSemi benchmark over {agg['seeds']} seeds ({agg['configuration']})",
        "",
        f"- command: `{agg.get('command', '')}`",
        f"- unions (one per seed): {', '.join(agg['unions'])}",
        f"- budget per trained model: {b['epochs']} epochs x {b['iterations']} iterations"
        + ("; runs on the union get T x the iterations (--budget-per task)" if agg["budget_per"] == "task" else "")
        + f"; folds {agg['folds']}",
        f"- machine: {agg['machine'].get('cpu_count')} CPU cores, "
        f"{'GPU ' + agg['machine']['gpu'] if agg['machine'].get('gpu') else 'no GPU'}",
        "",
        "## Test Dice (%), mean ± std over seeds of each seed's mean over test cases",
        "",
    ]

    def dice(t: str, i: int) -> str:
        s = agg["dice_over_seeds"][methods[i]["key"]][t]
        return "n/a" if s["mean"] is None else f"{_pct(s['mean'])} ± {_pct(s['std'])}"

    lines += report.markdown_table([m["label"] for m in methods], rows, dice)
    for metric, title, digits in (("hd95", "HD95 (mm)", 1), ("fp_components", "False-positive components per test "
                                                                          "case", 1)):
        table = agg.get(f"{metric}_over_seeds") or {}
        if not table:
            continue
        lines += ["", f"## {title}, mean ± std over seeds of each seed's mean over test cases", ""]
        lines += report.markdown_table([m["label"] for m in methods], rows,
                                       lambda t, i, table=table, d=digits: _plain(table[methods[i]["key"]][t], d))
    compared = [m for m in methods if m["key"] in agg["paired_difference_to_baseline"]]

    def paired(t: str, i: int) -> str:
        return _ci(agg["paired_difference_to_baseline"][compared[i]["key"]][t])

    if compared:
        lines += ["", f"## Paired difference to {base_label} (Dice points), mean [95 % CI] over seeds x test "
                  "cases", ""]
        lines += report.markdown_table([m["label"] for m in compared], rows, paired)
    labels = {m["key"]: m["label"] for m in methods}
    named = {f"{labels[p['method']]} - {labels[p['reference']]}": p["difference"]
             for p in agg.get("paired_differences", [])}
    if named:
        lines += ["", "## Paired differences between all methods (Dice points), mean [95 % CI] over seeds x test "
                  "cases", ""]
        lines += report.markdown_table(rows, list(named), lambda name, i: _ci(named[name][rows[i]]),
                                       first="difference")
    lines += ["", "## Collapse (a task whose test cases all have Dice 0)", ""]
    if agg["collapsed"]:
        lines += [f"- {c['method']}, {c['task']}, seed {c['seed']}" for c in agg["collapsed"]]
    else:
        lines.append("- none")
    lines += ["", f"Learning curves of every seed: `{SEEDS_CURVES_PNG}`; per-seed reports: `seed<s>/report.md`.", ""]
    return "\n".join(lines)


def seeds_curves_plot(agg: dict, path: str) -> None:
    plt = report.pyplot()
    methods = agg["methods"]
    with plt.style.context("default"):
        fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.4), squeeze=False, sharey=True)
        for ax, m in zip(axes[0], methods):
            for c in agg["curves"].get(m["key"], []):
                dice = [np.nan if v is None else v for v in c["pseudo_dice"]]
                label = f"seed {c['seed']}" + (f" {c['task']}" if c.get("task") else "")
                line, = ax.plot(c["steps"][: len(dice)], dice, lw=1, label=label)
                if c.get("switch_step") is not None:
                    ax.axvline(c["switch_step"], color=line.get_color(), ls="--", lw=0.7)
            ax.set_title(m["label"], fontsize=9)
            ax.set_xlabel("optimizer steps")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
        axes[0][0].set_ylabel("online pseudo Dice (validation patches)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def write_seed_report(out: str, agg: dict, per_seed: list[dict]) -> list[str]:
    paths = [join(out, SEEDS_JSON), join(out, SEEDS_MD), join(out, SEEDS_CURVES_PNG)]
    with open(paths[0], "w") as f:
        json.dump(agg, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(seeds_markdown(agg))
    seeds_curves_plot(agg, paths[2])
    return paths


