"""The benchmark's preparation, before anything trains: input checks, the benchmark plans, the per-task datasets
of the per-task methods and the list of training runs (see :mod:`.comparison`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from functools import partial
from os.path import isdir, isfile, join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_versemi.benchmark.methods import (
    BASELINE,
    CHECKPOINT,
    PSEUDO,
    BenchmarkContext,
    BenchmarkError,
    Budget,
    Method,
    TrainingRun,
    bench_plans_identifier,
    method_by_name,
)
from nnunetv2_versemi.data.preprocess import missing_unlabeled, plan_and_preprocess
from nnunetv2_versemi.data.task_dataset import (
    SOURCE_KEY,
    write_pseudo_labeled_task_dataset,
    write_task_dataset,
)
from nnunetv2_versemi.nnunet_paths import (
    dataset_id,
    dataset_name,
    free_dataset_id,
    preprocessed_folder,
)
from nnunetv2_versemi.plans_presets import PlansPresetError, apply_overlay, load_overlay
from nnunetv2_versemi.tasktable import TABLE_KEY, Task, TaskTable, TaskTableError


# ---- input checks -------------------------------------------------------------------------------------
def _fold(f: str):
    if f == "all":
        return "all"
    try:
        return int(f)
    except ValueError as e:
        raise BenchmarkError(f"--folds takes integers or 'all', got '{f}'") from e


def _require_env() -> None:
    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not os.environ.get(v)]
    if missing:
        raise BenchmarkError(f"Set {', '.join(missing)} (nnU-Net's folders) before running the benchmark")


def _union(dataset: str) -> tuple[str, int]:
    name = dataset_name(dataset)
    return name, dataset_id(name)


def labeled_test_cases(raw: str, table: TaskTable, file_ending: str, num_channels: int) -> dict[str, list[str]]:
    """Per task: the table's test cases that have a label in labelsTs and all images in imagesTs."""
    out, problems = {}, []
    for t in table.tasks:
        cases = []
        for c in t.test:
            if not isfile(join(raw, "labelsTs", c + file_ending)):
                continue  # a test image without label cannot be scored
            missing = [join(raw, "imagesTs", f"{c}_{k:04d}{file_ending}") for k in range(num_channels)]
            missing = [f for f in missing if not isfile(f)]
            if missing:
                problems.append(f"Test case {c} (task {t.name}) has a label but no image {missing[0]}")
            cases.append(c)
        out[t.name] = sorted(cases)
    if problems:
        raise BenchmarkError("\n".join(problems))
    if not any(out.values()):
        raise BenchmarkError(
            f"The union dataset in {raw} has no labeled test cases (imagesTs/labelsTs). Merge with test cases "
            "(sources with imagesTs/labelsTs, or nnUNetv2_versemi_merge --test-fraction F)"
        )
    return out


def apply_preset(plans: dict, preset: str | None) -> dict:
    if preset is None:
        return plans

    skipped: list[str] = []
    try:
        out = apply_overlay(plans, load_overlay(preset), skipped)
    except PlansPresetError as e:
        raise BenchmarkError(f"Plans preset {preset}: {e}") from e
    for reason in skipped:
        print(f"Plans preset {preset}: skipped {reason}")
    return out


def base_configuration(plans: dict, configuration: str) -> str:
    """The configuration whose preprocessed data a (possibly inherited) configuration uses."""
    configs = plans["configurations"]
    seen = []
    while "inherits_from" in configs[configuration] and configuration not in seen:
        seen.append(configuration)
        configuration = configs[configuration]["inherits_from"]
    return configuration


def write_json_if_changed(path: str, content: dict) -> None:
    if isfile(path):
        with open(path) as f:
            if json.load(f) == content:
                return
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=4)
    os.replace(path + ".tmp", path)


def bench_plans(plans: dict, identifier: str, preset: str | None) -> dict:
    out = apply_preset(plans, preset)
    out = json.loads(json.dumps(out))
    out["plans_name"] = identifier
    return out


def _check_plain_nnunet_folds(pp: str, folds: list, methods: list[Method]) -> None:
    """Stock nnUNetTrainer on the union (method b) cannot train a fold without validation cases (VerSemi
    trainers validate such tasks on their training cases, and the per-task datasets of (a) do the same)."""
    path = join(pp, "splits_final.json")
    if not any(m.key == "union" for m in methods) or not isfile(path):
        return
    splits = load_json(path)
    empty = [f for f in folds if f != "all" and f < len(splits) and not splits[f]["val"]]
    if empty:
        raise BenchmarkError(
            f"Fold(s) {empty} of {path} have no validation case (too few labeled cases per task): nnU-Net on the "
            "union (method b) cannot train them. Use --folds all, or merge more labeled cases")


def _load_union_plans(args: argparse.Namespace, union_id: int, pp: str) -> tuple[str, dict, TaskTable, dict]:
    """The union's plans file, its plans, task table and plans with the preset applied; checks the configuration."""
    plans_file = join(pp, args.p + ".json")
    if not isfile(plans_file):
        raise BenchmarkError(
            f"{plans_file} not found: plan the union with nnUNetv2_versemi_plan_and_preprocess -d {union_id} "
            f"-c {args.c}"
        )
    plans = load_json(plans_file)
    try:
        table = TaskTable.from_plans(plans, where=plans_file)
    except TaskTableError as e:
        raise BenchmarkError(str(e)) from e
    plans_eff = apply_preset(plans, args.plans_preset)
    if args.c not in plans_eff["configurations"]:
        raise BenchmarkError(
            f"Configuration '{args.c}' is not in {plans_file}"
            + (f" (with preset {args.plans_preset})" if args.plans_preset else "")
            + f"; it has {', '.join(plans_eff['configurations'])}"
        )
    return plans_file, plans, table, plans_eff


def _preprocessed_data_identifier(pp: str, plans_eff: dict, configuration: str, union_id: int) -> str:
    """The data identifier of ``configuration``; checks that its preprocessed data exist."""
    data_id = PlansManager(plans_eff).get_configuration(configuration).data_identifier
    if not isdir(join(pp, data_id)):
        raise BenchmarkError(
            f"{join(pp, data_id)} does not exist: preprocess configuration "
            f"{base_configuration(plans_eff, configuration)} with nnUNetv2_versemi_plan_and_preprocess -d {union_id} "
            f"-c {base_configuration(plans_eff, configuration)}"
        )
    return data_id


def _raw_dataset_json(raw: str, table: TaskTable, plans_file: str) -> dict:
    """The union's raw dataset.json; checks that its task table matches the plans'."""
    if not isfile(join(raw, "dataset.json")):
        raise BenchmarkError(f"{raw}/dataset.json not found: the benchmark reads the union's raw test cases")
    dj = load_json(join(raw, "dataset.json"))
    if TABLE_KEY not in dj or not TaskTable.from_dataset_json(dj).same_structure(table):
        raise BenchmarkError(
            f"The task tables of {raw}/dataset.json and {plans_file} differ: re-run the planning"
        )
    return dj


def _checked_methods(
    args: argparse.Namespace, union: str, union_id: int, pp: str, data_id: str, table: TaskTable, plans_eff: dict
) -> list[Method]:
    """The methods of ``--methods``; checks for duplicates and, for VerSemi, preprocessed unlabeled cases."""
    methods = [method_by_name(m) for m in args.methods]
    if len({m.key for m in methods}) != len(methods):
        raise BenchmarkError(f"--methods lists a method twice: {args.methods}")
    keys = [m.key for m in methods]
    if PSEUDO in keys and BASELINE not in keys:
        raise BenchmarkError("Method e (nnU-Net with pseudo labels) labels the unlabeled images with the models of "
                             "method a: add a to --methods")
    if any(m.unlabeled for m in methods):  # (d) and every VerSemi variant with an unlabeled term
        missing = missing_unlabeled(pp, data_id, table)
        if missing:
            raise BenchmarkError(
                f"{len(missing)} unlabeled case(s) of {union} are not preprocessed for {args.c} (e.g. {missing[0]}): "
                f"run nnUNetv2_versemi_plan_and_preprocess -d {union_id} -c {base_configuration(plans_eff, args.c)}"
            )
    return methods


def prepare_benchmark(args: argparse.Namespace) -> BenchmarkContext:
    """Every check that can fail, before anything is written or trained."""
    _require_env()
    union, union_id = _union(args.d)
    raw, pp = join(os.environ["nnUNet_raw"], union), preprocessed_folder(union)
    plans_file, plans, table, plans_eff = _load_union_plans(args, union_id, pp)
    data_id = _preprocessed_data_identifier(pp, plans_eff, args.c, union_id)
    dj = _raw_dataset_json(raw, table, plans_file)
    methods = _checked_methods(args, union, union_id, pp, data_id, table, plans_eff)
    folds = [_fold(f) for f in args.folds]
    _check_plain_nnunet_folds(pp, folds, methods)
    budget = Budget(args.epochs, args.iterations, args.val_iterations)
    bench = bench_plans_identifier(args.p, budget, args.plans_preset)
    out = args.o or join(os.environ["nnUNet_results"], union, f"benchmark__{bench}__{args.c}")
    n_ch = len(dj["channel_names"])
    ctx = BenchmarkContext(
        union=union,
        union_id=union_id,
        table=table,
        raw=raw,
        pp=pp,
        configuration=args.c,
        plans=args.p,
        bench_plans=bench,
        budget=budget,
        budget_per=args.budget_per,
        folds=folds,
        out=os.path.abspath(out),
        device=args.device,
        npp=args.npp,
        tta=not args.disable_tta,
        skip_val=args.skip_val,
        test_cases=labeled_test_cases(raw, table, dj["file_ending"], n_ch),
        file_ending=dj["file_ending"],
        num_channels=n_ch,
        methods=methods,
        preset=args.plans_preset,
        base_configuration=base_configuration(plans_eff, args.c),
        data_identifier=data_id,
        plans_content=plans,
        # ids a caller has reserved for datasets it writes later (the add-task benchmark's unions of every seed):
        # no per-task dataset takes them
        claimed_ids=set(getattr(args, "reserved_ids", ())),
    )
    return ctx


# ---- per-task datasets (method a) -----------------------------------------------------------------------
def alone_dataset_name(ctx: BenchmarkContext, task: Task, kind: str = "") -> str:
    """The per-task dataset of ``task`` (``kind`` "PL": its pseudo-labeled version for method e): reused when
    present, else under the first free id after the union."""
    suffix = f"VSBench{ctx.union_id:03d}_{task.name}{kind}"
    raw_root = os.environ["nnUNet_raw"]
    for d in sorted(os.listdir(raw_root)) if isdir(raw_root) else []:
        if re.fullmatch(r"Dataset\d{3}_" + re.escape(suffix), d):
            return d
    return f"Dataset{free_dataset_id(ctx.union_id, ctx.claimed_ids):03d}_{suffix}"


def ensure_alone_dataset(ctx: BenchmarkContext, task: Task) -> str:
    """The per-task dataset of baseline (a): written by :func:`write_task_dataset` (again, with its models
    removed, when the union was merged again), planned and preprocessed by the package's plan-and-preprocess
    (stock nnU-Net planning); returns its name."""
    name, written = write_task_dataset(ctx.union, task.name, alone_dataset_name(ctx, task), replace=True)
    if written:
        ctx.log(f"Wrote per-task dataset {name} ({len(task.labeled)} labeled cases of task {task.name})")
    _plan_task_dataset(ctx, name, task.labeled, written)
    return name


def _plan_task_dataset(ctx: BenchmarkContext, name: str, cases: list[str], written: bool) -> None:
    """Plans and preprocesses a per-task dataset unless its plans and the preprocessed ``cases`` are there,
    after removing its models when it was written now; writes the benchmark's copy of its plans."""
    pp = join(os.environ["nnUNet_preprocessed"], name)
    models = join(os.environ["nnUNet_results"], name)
    if written and isdir(models):
        shutil.rmtree(models)  # trained on the cases of an earlier version of the dataset
    plans_file = join(pp, ctx.plans + ".json")
    data_dir = join(pp, ctx.data_identifier)
    have = set(os.listdir(data_dir)) if isdir(data_dir) else set()
    if not isfile(plans_file) or not all(f"{c}.b2nd" in have or f"{c}.npz" in have for c in cases):
        ctx.log(f"Planning and preprocessing {name} ({ctx.base_configuration})")
        identifier = plan_and_preprocess(name, [ctx.base_configuration], [max(1, ctx.npp)], max(1, ctx.npp),
                                         overwrite_plans_name=None if ctx.plans == "nnUNetPlans" else ctx.plans,
                                         progress=False)
        if identifier != ctx.plans:
            raise BenchmarkError(f"Planning {name} wrote {identifier}.json, expected {ctx.plans}.json")

    write_json_if_changed(join(pp, ctx.bench_plans + ".json"),
                           bench_plans(load_json(plans_file), ctx.bench_plans, ctx.preset))


def ensure_pseudo_dataset(ctx: BenchmarkContext, task: Task, alone: TrainingRun, name: str) -> None:
    """Method e's dataset of ``task``: the task's labeled cases plus its unlabeled images labeled by (a)'s model
    (all its folds, ensembled as nnU-Net predicts), rewritten when (a)'s checkpoints changed; then planned and
    preprocessed like (a)'s."""
    made_by = {"model_folder": alone.model_folder(), "folds": [str(f) for f in alone.folds],
               "checkpoints_mtime": [int(os.path.getmtime(alone.checkpoint(f))) for f in alone.folds]}
    current = join(os.environ["nnUNet_raw"], name, "dataset.json")
    if isfile(current) and load_json(current).get(SOURCE_KEY, {}).get("made_by") == made_by:
        written = False
    else:
        ctx.log(f"Pseudo-labeling {len(task.unlabeled)} unlabeled images of {task.name} with {alone.name}")
        tmp = tempfile.mkdtemp(prefix=".pseudo_", dir=ctx.out)
        try:
            fe = ctx.file_ending
            cases = sorted(task.unlabeled)
            images = [[join(ctx.raw, "imagesUnlabeled", f"{c}_{k:04d}{fe}") for k in range(ctx.num_channels)]
                      for c in cases]
            predictor = predictor_for(ctx, alone)
            predictor.predict_from_files(images, [join(tmp, c) for c in cases], save_probabilities=False,
                                         overwrite=True, num_processes_preprocessing=max(1, ctx.npp),
                                         num_processes_segmentation_export=max(1, ctx.npp))
            name, written = write_pseudo_labeled_task_dataset(ctx.union, task.name, name,
                                                              {c: join(tmp, c + fe) for c in cases}, made_by)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ctx.log(f"Wrote {name}: {len(task.labeled)} labeled + {len(task.unlabeled)} pseudo-labeled cases")
    _plan_task_dataset(ctx, name, [*task.labeled, *task.unlabeled], written)


# ---- runs ---------------------------------------------------------------------------------------------
def build_runs(ctx: BenchmarkContext) -> list[TrainingRun]:
    """One run per method on the union, one per method and task for the per-task methods; method e's runs come
    last, as they need (a)'s models."""
    runs: list[TrainingRun] = []
    all_cases = sorted(c for cases in ctx.test_cases.values() for c in cases)
    for m in sorted(ctx.methods, key=lambda m: m.key == PSEUDO):
        if not m.per_task:
            budget, plans = union_budget(ctx)
            runs.append(TrainingRun(m, ctx.union, plans, ctx.configuration, ctx.folds, all_cases, budget=budget))
            continue
        for ti, t in enumerate(ctx.table.tasks):
            if not ctx.test_cases[t.name]:
                ctx.log(f"Task {t.name} has no labeled test case: no per-task {m.key} run for it")
                continue
            name = alone_dataset_name(ctx, t, "PL") if m.key == PSEUDO else ensure_alone_dataset(ctx, t)
            run = TrainingRun(m, name, ctx.bench_plans, ctx.configuration, ctx.folds, ctx.test_cases[t.name],
                              task=t.name, task_index=ti, local_to_merged=[0, *t.merged_values], budget=ctx.budget)
            if m.key == PSEUDO:
                alone = next(r for r in runs if r.method.key == BASELINE and r.task == t.name)
                run.prepare = partial(ensure_pseudo_dataset, ctx, t, alone, name)
            runs.append(run)
    return runs


def union_budget(ctx: BenchmarkContext) -> tuple[Budget, str]:
    """Budget and benchmark plans identifier of the runs on the union. ``--budget-per task`` gives them T
    times the iterations per epoch, so that every task gets as many labeled batches as its per-task model."""
    if ctx.budget_per == "task":
        b = ctx.budget
        budget = Budget(b.epochs, b.iterations * ctx.table.num_tasks, b.val_iterations)
        return budget, bench_plans_identifier(ctx.plans, budget, ctx.preset)
    return ctx.budget, ctx.bench_plans


def device_for(name: str):

    if name == "cuda":
        if not torch.cuda.is_available():
            raise BenchmarkError("-device cuda: no CUDA device available (use -device cpu)")
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", 0)
    return torch.device(name)


def predictor_for(ctx: BenchmarkContext, run: TrainingRun) -> nnUNetPredictor:
    """nnU-Net's predictor of the run's model (all its folds), with the benchmark's test-time settings."""
    device = device_for(ctx.device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=ctx.tta,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(run.model_folder(), run.folds, CHECKPOINT)
    return predictor
