"""``nnUNetv2_versemi_benchmark``: VerSemi against nnU-Net baselines on one union dataset.

Every method gets the same labeled cases (the union's, split by the union's ``splits_final.json``), the same
held-out test cases (the union's ``imagesTs``/``labelsTs``, listed per task in the task table) and the same
training budget (epochs x iterations per epoch and validation iterations per epoch, for every trained model;
with ``--budget-per task`` the runs on the union get T times the iterations, T = number of tasks):

  (a) ``alone``   nnUNetTrainer on each task alone, labeled cases only. The benchmark writes one raw dataset
                  per task from the union's labeled cases (images as in the union, already normalized, channel
                  ``noNorm``; labels remapped to the task's classes 1..K; the union's split restricted to the
                  task), plans and preprocesses it with stock nnU-Net (only the requested configuration).
  (b) ``union``   nnUNetTrainer on the union's labeled cases (merged labels).
  (c) ``noUnsup`` VerSemiTrainer_noUnsup (prompts, synthetic task, no unlabeled images).
  (d) ``versemi`` VerSemiTrainer.
  (e) ``pseudo``  nnU-Net with pseudo labels, per task (the recipe nnU-Net's maintainers recommend for unlabeled
                  images): (a)'s model of the task predicts the task's unlabeled images, and a fresh
                  nnUNetTrainer trains on the labeled cases plus these pseudo-labeled ones, with (a)'s budget.
                  Its compute is (a)'s training, the prediction of the unlabeled images and one more training.
  (f) ``alonePCD`` nnUNetTrainer_presentClassDice on each task alone: (a) with VerSemi's present-class Dice,
                  which tells how much of VerSemi's gain over (a) is its loss alone.

The budget is set without code: training runs in this process. Each trainer is instantiated the way
``nnunetv2.run.run_training.get_trainer_from_args`` does it, then ``num_epochs``,
``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch`` are set before ``initialize`` builds the
learning-rate schedule. The checkpoint stores the real class name (nnUNetTrainer, VerSemiTrainer, ...), so
every nnU-Net predictor finds the class again. Runs of different budgets are kept apart by a benchmark plans
identifier, a copy of the plans under ``<plans>_vsbench[-<preset>]-e<E>-i<I>-v<V>`` (same data identifier,
so the preprocessed data are shared): models land in ordinary nnU-Net model folders
``$nnUNet_results/<dataset>/<trainer>__<that identifier>__<configuration>`` and work with ``nnUNetv2_predict
-p <that identifier>``.

Test cases are predicted with nnU-Net's ``nnUNetPredictor`` (sliding window, Gaussian, mirroring unless
``--disable_tta``); VerSemi models predict every case under its own task's prompt. All predictions are
written in the union's merged label space and scored per task by
:func:`nnunetv2_versemi.evaluation.evaluate.evaluate_folders` (Dice, HD95, IoU, ASD), each case on its own
task's classes. The report folder gets results.json, results.csv (one row per method and test case),
summary.csv, report.md, dice_boxplot.png and learning_curves.png (see :mod:`.report`).

Resume: a run whose folds all hold ``checkpoint_final.pth`` and whose test predictions are all present is
skipped; a fold with only ``checkpoint_latest.pth`` continues from it.

Subcommands: ``nnUNetv2_versemi_benchmark speed ...`` (step time and memory, :mod:`.speed`) and
``nnUNetv2_versemi_benchmark plans ...`` (apply a plans preset, :mod:`nnunetv2_versemi.plans_presets`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from os.path import isdir, isfile, join

import numpy as np
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm

from nnunetv2_versemi.benchmark import report
from nnunetv2_versemi.data.preprocess import missing_unlabeled, plan_and_preprocess
from nnunetv2_versemi.data.task_dataset import (
    SOURCE_KEY,
    write_pseudo_labeled_task_dataset,
    write_task_dataset,
)
from nnunetv2_versemi.discovery import ensure_ext_trainer_env
from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.evaluation.evaluate import evaluate_folders
from nnunetv2_versemi.inference.prompted import predict_files_under_prompts
from nnunetv2_versemi.nnunet_paths import (
    dataset_id,
    dataset_name,
    free_dataset_id,
    link_or_copy,
    preprocessed_folder,
)
from nnunetv2_versemi.plans_presets import PlansPresetError, apply_overlay, load_overlay
from nnunetv2_versemi.tasktable import TABLE_KEY, Task, TaskTable, TaskTableError
from nnunetv2_versemi.training.trainer import VerSemiTrainer

PROG = "nnUNetv2_versemi_benchmark"
BENCH_TAG = "vsbench"
STATE_DIR = "runs"
PRED_DIR = "predictions"
EVAL_DIR = "evaluation"
LOG_FILE = "benchmark.log"
CHECKPOINT = "checkpoint_final.pth"


class BenchmarkError(VerSemiInputError):
    """Bad input to the benchmark; raised before anything is trained."""


@dataclass(frozen=True)
class Method:
    key: str
    letter: str
    label: str
    trainer: str
    per_task: bool = False
    prompted: bool = False


METHODS = (
    Method("alone", "a", "(a) nnU-Net, each task alone", "nnUNetTrainer", per_task=True),
    Method("union", "b", "(b) nnU-Net on the union", "nnUNetTrainer"),
    Method("noUnsup", "c", "(c) VerSemi, labeled only", "VerSemiTrainer_noUnsup", prompted=True),
    Method("versemi", "d", "(d) VerSemi", "VerSemiTrainer", prompted=True),
    Method("pseudo", "e", "(e) nnU-Net with pseudo labels, each task alone", "nnUNetTrainer", per_task=True),
    Method("alonePCD", "f", "(f) nnU-Net, each task alone, present-class Dice", "nnUNetTrainer_presentClassDice",
           per_task=True),
)
PSEUDO = "pseudo"
DEFAULT_METHODS = ("a", "b", "c", "d", "e")
BASELINE = "alone"


def method_by_name(name: str) -> Method:
    """One of the four methods by letter or key, or any trainer nnU-Net finds by class name (an ablation such
    as ``VerSemiTrainer_dynamicHead``), trained on the union like (b)-(d)."""
    for m in METHODS:
        if name in (m.key, m.letter):
            return m

    cls = None
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        try:
            cls = recursive_find_trainer_class_by_name(name)
        except RuntimeError:  # nnU-Net raises when no trainer has that name
            cls = None
    if cls is None:
        valid = ", ".join(f"{m.letter}/{m.key}" for m in METHODS)
        raise BenchmarkError(f"Unknown method '{name}'; choose from {valid} or a trainer class name")
    return Method(name, name, name, name, prompted=issubclass(cls, VerSemiTrainer))


@dataclass(frozen=True)
class Budget:
    epochs: int = 1000
    iterations: int = 250
    val_iterations: int = 50

    def __post_init__(self):
        for k, v in asdict(self).items():
            if v < 1:
                raise BenchmarkError(f"--{k.replace('_', '-')} must be at least 1, got {v}")

    def tag(self) -> str:
        return f"e{self.epochs}-i{self.iterations}-v{self.val_iterations}"


def bench_plans_identifier(plans: str, budget: Budget, preset: str | None = None) -> str:
    """Plans identifier of the benchmark's copy of the plans: budget (and preset) in the name."""
    middle = f"-{re.sub(r'[^A-Za-z0-9]+', '', preset)}" if preset else ""
    return f"{plans}_{BENCH_TAG}{middle}-{budget.tag()}"


@dataclass
class TrainingRun:
    """One method on one dataset (each task is its own run for method a), all requested folds."""
    method: Method
    dataset: str
    plans: str
    configuration: str
    folds: list
    test_cases: list[str]
    task: str | None = None
    task_index: int | None = None
    local_to_merged: list[int] | None = None  # per-task methods: task class index -> merged value
    budget: Budget = field(default_factory=Budget)
    prepare: Callable[[], None] | None = None  # writes the run's dataset when it needs other runs' models (e)

    @property
    def name(self) -> str:
        return self.method.key if self.task is None else f"{self.method.key}-{self.task}"

    @property
    def trainer(self) -> str:
        return self.method.trainer

    def model_folder(self) -> str:
        return get_output_folder(self.dataset, self.trainer, self.plans, self.configuration)

    def checkpoint(self, fold) -> str:
        return join(self.model_folder(), f"fold_{fold}", CHECKPOINT)


@dataclass
class BenchmarkContext:
    union: str
    union_id: int
    table: TaskTable
    raw: str
    pp: str
    configuration: str
    plans: str
    bench_plans: str
    budget: Budget
    folds: list
    out: str
    budget_per: str
    device: str
    npp: int
    tta: bool
    skip_val: bool
    test_cases: dict[str, list[str]]  # task name -> test case ids with a label
    file_ending: str
    num_channels: int
    methods: list[Method] = field(default_factory=list)
    preset: str | None = None
    base_configuration: str = ""  # the configuration whose preprocessed data ``configuration`` uses
    data_identifier: str = ""
    plans_content: dict = field(default_factory=dict)
    claimed_ids: set[int] = field(default_factory=set)

    def log(self, msg: str) -> None:
        line = f"[{PROG} {datetime.now().strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        os.makedirs(self.out, exist_ok=True)
        with open(join(self.out, LOG_FILE), "a") as f:
            f.write(line + "\n")


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


def _apply_preset(plans: dict, preset: str | None) -> dict:
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


def _base_configuration(plans: dict, configuration: str) -> str:
    """The configuration whose preprocessed data a (possibly inherited) configuration uses."""
    configs = plans["configurations"]
    seen = []
    while "inherits_from" in configs[configuration] and configuration not in seen:
        seen.append(configuration)
        configuration = configs[configuration]["inherits_from"]
    return configuration


def _write_json_if_changed(path: str, content: dict) -> None:
    if isfile(path):
        with open(path) as f:
            if json.load(f) == content:
                return
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=4)
    os.replace(path + ".tmp", path)


def _bench_plans(plans: dict, identifier: str, preset: str | None) -> dict:
    out = _apply_preset(plans, preset)
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
    plans_eff = _apply_preset(plans, args.plans_preset)
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
            f"{_base_configuration(plans_eff, configuration)} with nnUNetv2_versemi_plan_and_preprocess -d {union_id} "
            f"-c {_base_configuration(plans_eff, configuration)}"
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
    if any(m.key == "versemi" for m in methods):
        missing = missing_unlabeled(pp, data_id, table)
        if missing:
            raise BenchmarkError(
                f"{len(missing)} unlabeled case(s) of {union} are not preprocessed for {args.c} (e.g. {missing[0]}): "
                f"run nnUNetv2_versemi_plan_and_preprocess -d {union_id} -c {_base_configuration(plans_eff, args.c)}"
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
        base_configuration=_base_configuration(plans_eff, args.c),
        data_identifier=data_id,
        plans_content=plans,
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

    _write_json_if_changed(join(pp, ctx.bench_plans + ".json"),
                           _bench_plans(load_json(plans_file), ctx.bench_plans, ctx.preset))


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
            predictor = _predictor(ctx, alone)
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


def prediction_folder(ctx: BenchmarkContext, method: Method) -> str:
    return join(ctx.out, PRED_DIR, method.key)


def run_finished(ctx: BenchmarkContext, run: TrainingRun) -> bool:
    folder = prediction_folder(ctx, run.method)
    return all(isfile(run.checkpoint(f)) for f in run.folds) and all(
        isfile(join(folder, c + ctx.file_ending)) for c in run.test_cases
    )


def _device(name: str):

    if name == "cuda":
        if not torch.cuda.is_available():
            raise BenchmarkError("-device cuda: no CUDA device available (use -device cpu)")
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", 0)
    return torch.device(name)


def train_fold(ctx: BenchmarkContext, run: TrainingRun, fold) -> float:
    """Train one fold in this process with the benchmark budget, built as ``nnUNetv2_train`` builds it and
    continued from its latest checkpoint like ``--c``; returns seconds (0 when already done)."""
    if isfile(run.checkpoint(fold)):
        return 0.0
    latest = join(run.model_folder(), f"fold_{fold}", "checkpoint_latest.pth")
    t0 = time.time()
    trainer = get_trainer_from_args(run.dataset, run.configuration, fold, run.trainer, run.plans,
                                    continue_training=isfile(latest), device=_device(ctx.device))
    # the budget: set before initialize(), which builds the learning-rate schedule from num_epochs
    trainer.num_epochs = run.budget.epochs
    trainer.num_iterations_per_epoch = run.budget.iterations
    trainer.num_val_iterations_per_epoch = run.budget.val_iterations
    if isfile(latest):
        ctx.log(f"{run.name} fold {fold}: continuing from {latest}")
        maybe_load_checkpoint(trainer, continue_training=True, validation_only=False)
    trainer.run_training()
    if not ctx.skip_val:
        trainer.perform_actual_validation(False)
    return time.time() - t0


def _image_lists(ctx: BenchmarkContext, cases: list[str]) -> list[list[str]]:
    fe = ctx.file_ending
    return [[join(ctx.raw, "imagesTs", f"{c}_{k:04d}{fe}") for k in range(ctx.num_channels)] for c in cases]


def _predictor(ctx: BenchmarkContext, run: TrainingRun) -> nnUNetPredictor:
    """nnU-Net's predictor of the run's model (all its folds), with the benchmark's test-time settings."""
    device = _device(ctx.device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=ctx.tta,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(run.model_folder(), run.folds, CHECKPOINT)
    return predictor


def predict_run(ctx: BenchmarkContext, run: TrainingRun) -> float:
    """Predict the run's test cases into the method's prediction folder (merged labels); returns seconds."""
    out = prediction_folder(ctx, run.method)
    todo = [c for c in run.test_cases if not isfile(join(out, c + ctx.file_ending))]
    if not todo:
        return 0.0
    t0 = time.time()
    predictor = _predictor(ctx, run)
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".predict_", dir=out)
    fe = ctx.file_ending
    try:
        predict_files_under_prompts(predictor, _image_lists(ctx, todo), [join(tmp, c) for c in todo],
                                    ctx.table.task_of_case if run.method.prompted else None, ctx.npp)
        for c in todo:
            src = join(tmp, c + fe)
            if run.local_to_merged is not None:  # per-task model: its classes 1..K -> the union's values
                img = sitk.ReadImage(src)
                lut = np.asarray(run.local_to_merged, dtype=np.uint8)
                arr = lut[sitk.GetArrayFromImage(img)]
                res = sitk.GetImageFromArray(arr)
                res.CopyInformation(img)
                sitk.WriteImage(res, src, True)
            os.replace(src, join(out, c + fe))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.time() - t0


def _state_path(ctx: BenchmarkContext, run: TrainingRun) -> str:
    return join(ctx.out, STATE_DIR, run.name + ".json")


def _load_state(ctx: BenchmarkContext, run: TrainingRun) -> dict:
    p = _state_path(ctx, run)
    if isfile(p):
        with open(p) as f:
            return json.load(f)
    return {}


def _save_state(ctx: BenchmarkContext, run: TrainingRun, state: dict) -> None:
    os.makedirs(join(ctx.out, STATE_DIR), exist_ok=True)
    with open(_state_path(ctx, run), "w") as f:
        json.dump(state, f, indent=2)


def train_and_predict(ctx: BenchmarkContext, runs: list[TrainingRun]) -> list[dict]:

    states = []
    with tqdm(runs, desc="benchmark runs", unit="run", file=sys.stdout) as bar:
        for run in bar:
            bar.set_postfix_str(run.name)
            state = _load_state(ctx, run)
            state.update(
                {
                    "run": run.name,
                    "method": run.method.key,
                    "letter": run.method.letter,
                    "task": run.task,
                    "dataset": run.dataset,
                    "trainer": run.trainer,
                    "plans": run.plans,
                    "configuration": run.configuration,
                    "folds": run.folds,
                    "budget": asdict(run.budget),
                    "model_folder": run.model_folder(),
                    "test_cases": len(run.test_cases),
                }
            )
            if run_finished(ctx, run):
                ctx.log(f"Skipping {run.name}: finished ({CHECKPOINT} and predictions present)")
                state["skipped_on_last_invocation"] = True
                states.append(state)
                _save_state(ctx, run, state)
                continue
            state["skipped_on_last_invocation"] = False
            if run.prepare is not None:
                t0 = time.time()
                run.prepare()
                state["prepare_seconds"] = time.time() - t0
            train_s = dict(state.get("train_seconds", {}))
            for fold in run.folds:
                if isfile(run.checkpoint(fold)):
                    ctx.log(f"{run.name} fold {fold}: {CHECKPOINT} present, not retraining")
                    continue
                ctx.log(
                    f"Training {run.name} fold {fold}: {run.trainer} on {run.dataset} ({run.configuration}, "
                    f"{run.budget.epochs} epochs x {run.budget.iterations} iterations)"
                )
                train_s[str(fold)] = train_fold(ctx, run, fold)
                state["train_seconds"] = train_s
                _save_state(ctx, run, state)
                # predictions of an earlier model of this run are stale now
                for c in run.test_cases:
                    stale = join(prediction_folder(ctx, run.method), c + ctx.file_ending)
                    if isfile(stale):
                        os.remove(stale)
            ctx.log(f"Predicting {len(run.test_cases)} test case(s) with {run.name}")
            state["predict_seconds"] = predict_run(ctx, run) or state.get("predict_seconds", 0.0)
            state["finished"] = datetime.now().isoformat(timespec="seconds")
            _save_state(ctx, run, state)
            states.append(state)
    return states


def evaluate_methods(ctx: BenchmarkContext) -> dict[str, dict]:

    ref = join(ctx.raw, "labelsTs")
    results = {}
    all_cases = {c for cases in ctx.test_cases.values() for c in cases}
    ref_dir = ref
    if set(c[: -len(ctx.file_ending)] for c in os.listdir(ref) if c.endswith(ctx.file_ending)) != all_cases:
        # labelsTs holds cases outside the table's test lists: score exactly the benchmark's test cases
        ref_dir = join(ctx.out, EVAL_DIR, "reference")
        os.makedirs(ref_dir, exist_ok=True)
        for c in all_cases:
            if not isfile(join(ref_dir, c + ctx.file_ending)):
                link_or_copy(join(ref, c + ctx.file_ending), join(ref_dir, c + ctx.file_ending))
    for m in ctx.methods:
        ctx.log(f"Evaluating {m.label}")
        results[m.key] = evaluate_folders(
            ref_dir,
            prediction_folder(ctx, m),
            ctx.table,
            task=None,
            num_processes=1,
            output_dir=join(ctx.out, EVAL_DIR, m.key),
        )
    return results


def run_benchmark(args: argparse.Namespace) -> dict:
    """The whole benchmark; returns the results dict written to results.json."""
    ensure_ext_trainer_env()
    ctx = prepare_benchmark(args)
    os.makedirs(ctx.out, exist_ok=True)
    ctx.log(
        f"Benchmark of {ctx.union} ({args.c}), methods {', '.join(m.key for m in ctx.methods)}, "
        f"budget {ctx.budget.tag()} per {ctx.budget_per}, folds {ctx.folds}, report in {ctx.out}"
    )
    union_plans = union_budget(ctx)[1]
    _write_json_if_changed(
        join(ctx.pp, union_plans + ".json"), _bench_plans(ctx.plans_content, union_plans, ctx.preset)
    )
    runs = build_runs(ctx)
    t0 = time.time()
    states = train_and_predict(ctx, runs)
    evals = evaluate_methods(ctx)
    results = report.collect(
        evals,
        states,
        ctx.table,
        methods=ctx.methods,
        baseline=BASELINE,
        meta={
            "dataset": ctx.union,
            "configuration": ctx.configuration,
            "plans": ctx.plans,
            "benchmark_plans": sorted({ctx.bench_plans, union_plans}),
            "plans_preset": ctx.preset,
            "budget": asdict(ctx.budget),
            "budget_per": ctx.budget_per,
            "folds": ctx.folds,
            "device": ctx.device,
            "tta": ctx.tta,
            "validation": not ctx.skip_val,
            "command": " ".join([PROG, *(getattr(args, "argv", None) or sys.argv[1:])]),
            "machine": report.machine_info(),
            "wall_seconds_this_invocation": time.time() - t0,
            "test_cases": ctx.test_cases,
        },
    )
    written = report.write_report(ctx.out, results)
    ctx.log(f"Wrote {', '.join(os.path.basename(w) for w in written)} to {ctx.out}")
    return results


# ---- CLI ----------------------------------------------------------------------------------------------
