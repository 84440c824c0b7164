"""``nnUNetv2_versemi_benchmark add-task``: adding a dataset to a trained VerSemi model, against retraining.

Given raw source datasets D1..DT (the last one is the new task), each seed s runs:

  before    VerSemi on the union of D1..D(T-1) (merge seed 12345 + s), the full budget of T-1 tasks;
  after     ``nnUNetv2_versemi_add_task`` adds DT to that model (same labeled-case rule and seed), and the grown
            union fine-tunes from the warm-start weights (stock ``-pretrained_weights`` loading) for
            ``--finetune-fraction`` of the from-scratch union's epochs (same iterations per epoch);
  scratch   VerSemi on the union of D1..DT from scratch, the full budget of T tasks;
  alone     per-task nnU-Net (method a of the benchmark) on every task of that union, DT included.

Every model is trained and scored by the benchmark itself (:func:`.comparison.run_benchmark`, same protocol
options: plans preset, epochs x iterations per task, ``--budget-per task``, fold ``all``), so the test cases of a
task are the same in all three unions (the merge selects cases per task name and seed). Stock routing of the
grown model is scored by ``nnUNetv2_versemi_benchmark recognition``.

Writes ``add_task.json`` / ``add_task.md`` (Dice per task and method, paired differences with 95 % t intervals
over seeds x test cases, the aims met or missed, the compute of each model) and ``add_task_curves.png`` (the new
task's pseudo Dice per step while fine-tuning and while training from scratch). Unions get the ids
``--first-id`` + 3 s (before), + 1 (after), + 2 (scratch). Finished steps are skipped on a rerun.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import math
import os
import re
import sys
import time
from os.path import isfile, join

from nnunetv2_versemi.benchmark.methods import BenchmarkError, Budget, bench_plans_identifier

PROG = "nnUNetv2_versemi_benchmark add-task"
MERGE_SEED = 12345
OLD, GROWN, FULL = 0, 1, 2
JSON, MD, PNG = "add_task.json", "add_task.md", "add_task_curves.png"


def _log(msg: str) -> None:
    print(f"{PROG}: {msg}", flush=True)


def _dataset_folder(dataset_id: int) -> str | None:
    found = glob.glob(join(os.environ["nnUNet_raw"], f"Dataset{dataset_id:03d}_*"))
    return os.path.basename(found[0]) if found else None


def _base_configuration(configuration: str) -> str:
    """The planned configuration that a preset configuration (2d_cpu, ...) inherits its data from."""
    return "2d" if configuration.startswith("2d") else "3d_fullres"


def _union(args: argparse.Namespace, sources: list[str], dataset_id: int, name: str, seed: int) -> str:
    """A union of ``sources`` merged, planned and preprocessed (each step skipped when its output exists)."""
    from nnunetv2_versemi.data.merge import merge_datasets
    from nnunetv2_versemi.data.preprocess import plan_and_preprocess

    folder = _dataset_folder(dataset_id)
    if folder is None:
        merge_datasets(sources, dataset_id, name, labeled_fraction=args.labeled_fraction,
                       labeled_cases=args.labeled_cases, seed=seed, num_processes=args.np, progress=False)
        folder = _dataset_folder(dataset_id)
    if not isfile(join(os.environ["nnUNet_preprocessed"], folder, "nnUNetPlans.json")):
        plan_and_preprocess(folder, [_base_configuration(args.c)], [args.np], args.np, progress=False)
    return folder


def _benchmark_args(args: argparse.Namespace, dataset: str, methods: list[str], out: str, epochs: int,
                    plans: str = "nnUNetPlans") -> argparse.Namespace:
    from nnunetv2_versemi.entrypoints.benchmark import build_benchmark_parser

    argv = ["-d", dataset, "-c", args.c, "-p", plans, "--epochs", str(epochs), "--iterations", str(args.iterations),
            "--val-iterations", str(args.val_iterations), "--folds", "all", "--budget-per", "task",
            "--methods", *methods, "-o", out, "-device", args.device, "--npp", str(args.np), "--skip-val"]
    if args.plans_preset:
        argv += ["--plans-preset", args.plans_preset]
    if args.disable_tta:
        argv.append("--disable_tta")
    parsed = build_benchmark_parser().parse_args(argv)
    parsed.argv = argv
    parsed.reserved_ids = union_ids(args)  # the per-task datasets of a seed must not take a later seed's union ids
    return parsed


def union_id(args: argparse.Namespace, s: int, role: int) -> int:
    """The id of seed ``s``'s union ``role`` (OLD, GROWN, FULL): ``--first-id`` + 3 s + role."""
    return args.first_id + 3 * s + role


def union_ids(args: argparse.Namespace) -> set[int]:
    """Every union id of the run, all seeds."""
    return {union_id(args, s, k) for s in range(args.seeds) for k in (OLD, GROWN, FULL)}


def _versemi_method(trainer: str) -> str:
    return "d" if trainer == "VerSemiTrainer" else trainer


def finetune_trainer(args: argparse.Namespace) -> str:
    """The trainer that fine-tunes the grown union: ``--finetune-tr``, by default the union models' ``-tr``."""
    return getattr(args, "finetune_tr", None) or args.tr


def _finetune_suffix(args: argparse.Namespace) -> str:
    """"" for the default fine-tuning, ``_<trainer>`` for another ``--finetune-tr`` (so fine-tunings of the same
    models sit side by side)."""
    tr = finetune_trainer(args)
    return "" if tr == args.tr else f"_{tr}"


def after_folder(args: argparse.Namespace, out: str, step: str) -> str:
    """``out``/``step`` (after, recognition), suffixed for another ``--finetune-tr``."""
    return join(out, step + _finetune_suffix(args))


def report_file(args: argparse.Namespace, name: str) -> str:
    """``-o``/add_task.json (.md, _curves.png), ``add_task_<trainer>...`` for another ``--finetune-tr``."""
    return join(args.o, name.replace("add_task", "add_task" + _finetune_suffix(args), 1))


def _run_of(results: dict, trainer: str) -> dict:
    return next(r for r in results["runs"] if r["trainer"] == trainer)


def _benchmark(args: argparse.Namespace, dataset: str, methods: list[str], out: str, epochs: int,
               plans: str = "nnUNetPlans") -> dict:
    """The benchmark's results of ``methods`` on ``dataset`` (trained, predicted and scored unless done)."""
    from nnunetv2_versemi.benchmark.comparison import run_benchmark

    if isfile(join(out, "results.json")):
        with open(join(out, "results.json")) as f:
            done = json.load(f)
        if done.get("dataset") == dataset and {m["key"] for m in done["methods"]} >= set(_method_keys(methods)):
            return done
    return run_benchmark(_benchmark_args(args, dataset, methods, out, epochs, plans))


def _method_keys(methods: list[str]) -> list[str]:
    from nnunetv2_versemi.benchmark.methods import method_by_name

    return [method_by_name(m).key for m in methods]


def finetune_epochs(epochs: int, fraction: float) -> int:
    """Epochs of the fine-tuning: ``fraction`` of the from-scratch epochs (same iterations per epoch), at least 1,
    never more than the fraction allows."""
    return max(1, math.floor(epochs * fraction + 1e-9))


def _finetune(args: argparse.Namespace, grown: str, warm_start: str, plans_identifier: str, num_tasks: int,
              out: str) -> float:
    """Train the grown union from the warm-start weights (as ``nnUNetv2_train ... -pretrained_weights`` does) with
    the fine-tuning budget, under the benchmark's plans identifier for that budget (the one the benchmark then
    finds the model by), unless done; returns the training seconds (kept in ``out``/finetune.json)."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunetv2_versemi.benchmark.preparation import bench_plans, device_for, write_json_if_changed

    record = join(out, "finetune.json")
    budget = Budget(finetune_epochs(args.epochs, args.finetune_fraction), args.iterations * num_tasks,
                    args.val_iterations)
    identifier = bench_plans_identifier(plans_identifier, budget, args.plans_preset)
    pp = join(os.environ["nnUNet_preprocessed"], grown)
    with open(join(pp, plans_identifier + ".json")) as f:
        write_json_if_changed(join(pp, identifier + ".json"), bench_plans(json.load(f), identifier, args.plans_preset))
    fold_dir = join(get_output_folder(grown, finetune_trainer(args), identifier, args.c), "fold_all")
    if isfile(join(fold_dir, "checkpoint_final.pth")):
        if isfile(record):
            with open(record) as f:
                return float(json.load(f)["train_seconds"])
        return 0.0
    t0 = time.time()
    latest = isfile(join(fold_dir, "checkpoint_latest.pth"))
    trainer = get_trainer_from_args(grown, args.c, "all", finetune_trainer(args), identifier, continue_training=latest,
                                    device=device_for(args.device))
    trainer.num_epochs = budget.epochs
    trainer.num_iterations_per_epoch = budget.iterations
    trainer.num_val_iterations_per_epoch = budget.val_iterations
    if latest:
        maybe_load_checkpoint(trainer, continue_training=True, validation_only=False)
    else:
        trainer.initialize()
        load_pretrained_weights(trainer.network, warm_start, verbose=False)
    trainer.run_training()
    seconds = time.time() - t0
    os.makedirs(out, exist_ok=True)
    with open(record, "w") as f:
        json.dump({"train_seconds": seconds, "warm_start": warm_start, "budget": budget.tag()}, f, indent=2)
    return seconds


def _grown_union(args: argparse.Namespace, before: dict, old: str, new_source: str, grown_id: int, name: str,
                 seed: int) -> tuple[str, str, str]:
    """The old model with the new dataset added (``nnUNetv2_versemi_add_task``), unless done: (grown union, its
    warm-start checkpoint, the plans identifier of the old model)."""
    from nnunetv2_versemi.data.add_task import add_tasks
    from nnunetv2_versemi.training.warm_start import load_trained_model

    run = _run_of(before, args.tr)
    folder = _dataset_folder(grown_id)
    if folder is not None:
        warm = glob.glob(join(os.environ["nnUNet_preprocessed"], folder, "versemi_warm_start",
                              f"{args.tr}__{run['plans']}__{args.c}__fold_all.pth"))
        if warm:
            return folder, warm[0], run["plans"]
    model = load_trained_model(old, args.c, args.tr, run["plans"], ["all"])
    result = add_tasks(model, [new_source], grown_id, name, labeled_fraction=args.labeled_fraction,
                       labeled_cases=args.labeled_cases, seed=seed, overwrite=folder is not None,
                       num_processes=args.np, progress=False)
    return os.path.basename(result.raw_folder), result.warm_start["all"], run["plans"]


def _recognition(args: argparse.Namespace, grown: str, trainer: str, plans: str, out: str) -> dict:
    from nnunetv2_versemi.benchmark.recognition import run_recognition
    from nnunetv2_versemi.entrypoints.benchmark import build_recognition_parser

    if isfile(join(out, "recognition.json")):
        with open(join(out, "recognition.json")) as f:
            return json.load(f)
    argv = ["-d", grown, "-c", args.c, "-tr", trainer, "-p", plans, "-f", "all", "-o", out, "-device", args.device]
    if args.disable_tta:
        argv.append("--disable_tta")
    parsed = build_recognition_parser().parse_args(argv)
    parsed.argv = ["recognition", *argv]
    return run_recognition(parsed)


_TASK_DICE = re.compile(r"Pseudo dice per task (\{.*\})")


def task_curves(model_folder: str, iterations: int) -> dict[str, dict[str, list]]:
    """Per task: the steps and pseudo Dice of each epoch, from the training logs' ``Pseudo dice per task``
    lines (nan where a task had no foreground in the epoch's validation patches)."""
    curves: dict[str, dict[str, list]] = {}
    logs = sorted(glob.glob(join(model_folder, "fold_all", "training_log_*.txt")))
    epoch = 0
    for log in logs:
        with open(log) as f:
            for line in f:
                m = _TASK_DICE.search(line)
                if not m:
                    continue
                text = re.sub(r"np\.float\d*\(([^)]*)\)", r"\1", m.group(1)).replace("nan", "None")
                values = ast.literal_eval(text)
                epoch += 1
                for task, v in values.items():
                    c = curves.setdefault(task, {"steps": [], "dice": []})
                    c["steps"].append(epoch * iterations)
                    c["dice"].append(None if v is None else float(v))
    return curves


def _case_dice(results: dict, method_key: str) -> dict[tuple[str, str], float]:
    return {(c["task"], c["case"]): c["dice"] for c in results["cases"]
            if c["method"] == method_key and c["dice"] is not None}


def _paired(pairs: list[tuple[dict, dict]], tasks: list[str]) -> dict:
    """t interval of Dice(a) - Dice(b) over the (seed, test case) pairs of ``tasks`` scored by both."""
    from nnunetv2_versemi.benchmark.seeds import t_interval

    diffs = [a[k] - b[k] for a, b in pairs for k in a if k in b and k[0] in tasks]
    return t_interval(diffs)


def _mean_dice(per_case: dict, task: str) -> float | None:
    v = [d for (t, _), d in per_case.items() if t == task]
    return sum(v) / len(v) if v else None


def run_seed(args: argparse.Namespace, s: int, sources: list[str]) -> dict:
    out = join(args.o, f"seed{s}")
    seed = MERGE_SEED + s
    method, ft_tr = _versemi_method(args.tr), finetune_trainer(args)
    ft_method = _versemi_method(ft_tr)
    old = _union(args, sources[:-1], union_id(args, s, OLD), f"VSAdd{s}Old", seed)
    _log(f"seed {s}: the model before adding, on {old}")
    before = _benchmark(args, old, [method], join(out, "before"), args.epochs)
    full = _union(args, sources, union_id(args, s, FULL), f"VSAdd{s}All", seed)
    _log(f"seed {s}: from scratch and per task, on {full}")
    scratch = _benchmark(args, full, ["a", method], join(out, "scratch"), args.epochs)
    grown, warm, old_plans = _grown_union(args, before, old, sources[-1], union_id(args, s, GROWN), f"VSAdd{s}Grown", seed)
    _log(f"seed {s}: fine-tuning {grown} from {warm} with {ft_tr}")
    after_dir = after_folder(args, out, "after")
    ft_seconds = _finetune(args, grown, warm, old_plans, len(scratch["tasks"]), after_dir)
    after = _benchmark(args, grown, [ft_method], after_dir, finetune_epochs(args.epochs, args.finetune_fraction),
                       plans=old_plans)
    recognition = _recognition(args, grown, ft_tr, _run_of(after, ft_tr)["plans"],
                               after_folder(args, out, "recognition"))
    key, ft_key = _method_keys([method, ft_method])
    runs = {"before": _run_of(before, args.tr), "after": _run_of(after, ft_tr),
            "scratch": _run_of(scratch, args.tr)}
    runs["after"]["train_seconds"] = {"all": ft_seconds}
    alone_runs = [r for r in scratch["runs"] if r["letter"] == "a"]
    steps = {k: r["budget"]["epochs"] * r["budget"]["iterations"] for k, r in runs.items()}
    return {
        "seed": s, "unions": {"before": old, "after": grown, "scratch": full},
        "tasks": scratch["tasks"], "new_task": scratch["tasks"][-1],
        "cases": {"before": _case_dice(before, key), "after": _case_dice(after, ft_key),
                  "scratch": _case_dice(scratch, key), "alone": _case_dice(scratch, "alone")},
        "steps": steps,
        "train_seconds": {**{k: sum(r.get("train_seconds", {}).values()) for k, r in runs.items()},
                          "alone": sum(sum(r.get("train_seconds", {}).values()) for r in alone_runs)},
        "recognition": recognition["recognition_accuracy"],
        "curves": {"after": task_curves(runs["after"]["model_folder"], runs["after"]["budget"]["iterations"]),
                   "scratch": task_curves(runs["scratch"]["model_folder"], runs["scratch"]["budget"]["iterations"])},
    }


def summarise(per_seed: list[dict], finetune_fraction: float) -> dict:
    """Dice per task and method (mean over seeds x test cases), paired differences and the aims."""
    from nnunetv2_versemi.benchmark.seeds import _ci as ci  # the seed reports' interval text

    tasks, new = per_seed[0]["tasks"], per_seed[0]["new_task"]
    old_tasks = [t for t in tasks if t != new]
    pooled = {m: {} for m in ("before", "after", "scratch", "alone")}
    for r in per_seed:
        for m in pooled:
            pooled[m].update({(t, f"seed{r['seed']}:{c}"): d for (t, c), d in r["cases"][m].items()})
    dice = {m: {t: _mean_dice(pooled[m], t) for t in tasks} for m in pooled}

    def pairs(a: str, b: str) -> list[tuple[dict, dict]]:
        return [(r["cases"][a], r["cases"][b]) for r in per_seed]

    diff = {"new task: after - alone": _paired(pairs("after", "alone"), [new]),
            "new task: after - scratch": _paired(pairs("after", "scratch"), [new]),
            **{f"{t}: after - before": _paired(pairs("after", "before"), [t]) for t in old_tasks}}
    n_cases = sum(a["n_cases"] for r in per_seed for a in r["recognition"].values())
    n_right = sum(round(a["cases"] * a["n_cases"]) for r in per_seed for a in r["recognition"].values()
                  if a["cases"] is not None)
    compute = max(r["steps"]["after"] / r["steps"]["scratch"] for r in per_seed)

    def aim(name: str, value, met: bool, text: str) -> dict:
        return {"aim": name, "value": value, "met": bool(met), "measured": text}

    aims = [aim("fine-tuning compute <= 25 % of the from-scratch union's (steps)", compute,
                compute <= finetune_fraction + 1e-9 and finetune_fraction <= 0.25, f"{compute:.0%}")]
    for k, label in (("new task: after - alone", "new task >= per-task nnU-Net - 1"),
                     ("new task: after - scratch", "new task >= from-scratch union - 1")):
        d = diff[k]
        aims.append(aim(label, d["mean"], d["mean"] is not None and d["mean"] >= -0.01, ci(d)))
    for t in old_tasks:
        d = diff[f"{t}: after - before"]
        aims.append(aim(f"{t} (old) within 1 point of the model before adding", d["mean"],
                        d["mean"] is not None and d["mean"] >= -0.01, ci(d)))
    aims.append(aim("stock routing recognises >= 99 % of test cases (old and new tasks)",
                    n_right / max(n_cases, 1), n_cases > 0 and n_right / n_cases >= 0.99,
                    f"{n_right} of {n_cases}"))
    return {"tasks": tasks, "new_task": new, "dice": dice, "paired_differences": diff, "aims": aims,
            "recognised_cases": {"right": n_right, "total": n_cases}}


def markdown(result: dict) -> str:
    s = result["summary"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"# Adding {s['new_task']} to a trained model ({len(result['seeds'])} seed(s))", "",
             f"`{result['command']}`", "",
             "Mean test Dice over seeds x test cases. before: the model of the other tasks; after: that model with "
             f"{s['new_task']} added and fine-tuned ({result['finetune_fraction']:.0%} of the from-scratch epochs, "
             f"{result.get('finetune_trainer', 'the same trainer')}); "
             "scratch: VerSemi on all tasks from scratch; alone: per-task nnU-Net.", "",
             "| task | before | after | scratch | alone |", "|---|---|---|---|---|"]
    for t in s["tasks"]:
        lines.append(f"| {t}{' (new)' if t == s['new_task'] else ''} | {pct(s['dice']['before'][t])} | "
                     f"{pct(s['dice']['after'][t])} | {pct(s['dice']['scratch'][t])} | {pct(s['dice']['alone'][t])} |")
    lines += ["", "| aim | measured | met |", "|---|---|---|"]
    lines += [f"| {a['aim']} | {a['measured']} | {'yes' if a['met'] else 'no'} |" for a in s["aims"]]
    lines += ["", "Compute per seed (training steps; seconds on this machine):", "",
              "| seed | before | after (fine-tuning) | scratch | alone (all tasks) |", "|---|---|---|---|---|"]
    for r in result["seeds"]:
        st, sec = r["steps"], r["train_seconds"]
        lines.append(f"| {r['seed']} | {st['before']} / {sec['before']:.0f} s | {st['after']} / {sec['after']:.0f} s "
                     f"| {st['scratch']} / {sec['scratch']:.0f} s | {sec['alone']:.0f} s |")
    return "\n".join(lines) + "\n"


def curves_plot(result: dict, path: str) -> None:
    from nnunetv2_versemi.benchmark.report import pyplot

    plt = pyplot()
    # the models trained in this process left nnU-Net's seaborn poster style switched on: plot in matplotlib's own
    with plt.style.context("default"):
        _curves_plot(plt, result, path)


def _curves_plot(plt, result: dict, path: str) -> None:
    new = result["summary"]["new_task"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result["seeds"]:
        for kind, style in (("after", "-"), ("scratch", "--")):
            c = r["curves"][kind].get(new)
            if c:
                ax.plot(c["steps"], [float("nan") if v is None else v for v in c["dice"]], style,
                        label=f"seed {r['seed']}, {'fine-tuning' if kind == 'after' else 'from scratch'}")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{new}: pseudo Dice (validation patches)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"New task {new}: fine-tuned from the trained model vs from scratch", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def claim_union_ids(args: argparse.Namespace) -> None:
    """Check that every union id of the run is free or holds that union. A per-task dataset of this run that sits
    on a union id (made when the run had fewer ``--seeds``: it only skipped the union ids of that run) moves to a
    free id, trained models included; any other dataset there is refused before anything runs."""
    from nnunetv2_versemi.nnunet_paths import free_dataset_id, relocate_dataset

    ours = union_ids(args)
    for s in range(args.seeds):
        for k, role in ((OLD, "Old"), (GROWN, "Grown"), (FULL, "All")):
            i = union_id(args, s, k)
            taken = _dataset_folder(i)
            if taken is None or taken == f"Dataset{i:03d}_VSAdd{s}{role}":
                continue
            m = re.fullmatch(r"Dataset\d{3}_VSBench(\d{3})_.+", taken)
            if m is None or int(m.group(1)) not in ours:
                raise BenchmarkError(f"Dataset id {i} is taken by {taken}; choose another --first-id")
            moved = relocate_dataset(taken, free_dataset_id(i, set(ours)))
            _log(f"moved per-task dataset {taken} to {moved}: its id is seed {s}'s union id now")


def run_add_task_benchmark(args: argparse.Namespace) -> dict:
    from nnunetv2_versemi.discovery import ensure_ext_trainer_env
    from nnunetv2_versemi.nnunet_paths import dataset_name

    ensure_ext_trainer_env()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(var):
            raise BenchmarkError(f"{var} is not set")
    if len(args.datasets) < 2:
        raise BenchmarkError(f"--datasets needs at least two datasets (the last one is added), got {args.datasets}")
    if not 0 < args.finetune_fraction <= 1:
        raise BenchmarkError(f"--finetune-fraction must be in (0, 1], got {args.finetune_fraction}")
    sources = [dataset_name(d) for d in args.datasets]
    claim_union_ids(args)
    os.makedirs(args.o, exist_ok=True)
    per_seed = [run_seed(args, s, sources) for s in range(args.seeds)]
    result = {"command": " ".join([PROG, *(getattr(args, "argv", None) or sys.argv[2:])]),
              "datasets": sources, "finetune_fraction": args.finetune_fraction,
              "trainer": args.tr, "finetune_trainer": finetune_trainer(args),
              "budget_per_task": {"epochs": args.epochs, "iterations": args.iterations,
                                  "val_iterations": args.val_iterations},
              "configuration": args.c, "plans_preset": args.plans_preset, "device": args.device,
              "summary": summarise(per_seed, args.finetune_fraction),
              "seeds": [{**r, "cases": {m: [[t, c, d] for (t, c), d in v.items()] for m, v in r["cases"].items()}}
                        for r in per_seed]}
    with open(report_file(args, JSON), "w") as f:
        json.dump(result, f, indent=2)
    with open(report_file(args, MD), "w") as f:
        f.write(markdown(result))
    curves_plot(result, report_file(args, PNG))
    print(markdown(result))
    return result

