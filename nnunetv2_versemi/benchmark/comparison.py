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
  (g) ``aloneFg67`` nnUNetTrainer_foreground67 on each task alone: (a) with two of three batch slots forced to hold
                  foreground, the sampling of ``VerSemiTrainer_foreground67``.

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
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from os.path import isfile, join

import numpy as np
import SimpleITK as sitk
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
from tqdm import tqdm

from nnunetv2_versemi.benchmark import report
from nnunetv2_versemi.benchmark.methods import (
    BASELINE,
    CHECKPOINT,
    EVAL_DIR,
    PRED_DIR,
    PROG,
    STATE_DIR,
    BenchmarkContext,
    BenchmarkError,
    Method,
    TrainingRun,
)
from nnunetv2_versemi.benchmark.preparation import (
    bench_plans,
    build_runs,
    device_for,
    predictor_for,
    prepare_benchmark,
    union_budget,
    write_json_if_changed,
)
from nnunetv2_versemi.discovery import ensure_ext_trainer_env
from nnunetv2_versemi.evaluation.evaluate import evaluate_folders
from nnunetv2_versemi.inference.prompted import predict_files_under_prompts
from nnunetv2_versemi.nnunet_paths import (
    link_or_copy,
)


def prediction_folder(ctx: BenchmarkContext, method: Method) -> str:
    return join(ctx.out, PRED_DIR, method.key)


def run_finished(ctx: BenchmarkContext, run: TrainingRun) -> bool:
    folder = prediction_folder(ctx, run.method)
    return all(isfile(run.checkpoint(f)) for f in run.folds) and all(
        isfile(join(folder, c + ctx.file_ending)) for c in run.test_cases
    )


def train_fold(ctx: BenchmarkContext, run: TrainingRun, fold) -> float:
    """Train one fold in this process with the benchmark budget, built as ``nnUNetv2_train`` builds it and
    continued from its latest checkpoint like ``--c``; returns seconds (0 when already done)."""
    if isfile(run.checkpoint(fold)):
        return 0.0
    latest = join(run.model_folder(), f"fold_{fold}", "checkpoint_latest.pth")
    t0 = time.time()
    trainer = get_trainer_from_args(run.dataset, run.configuration, fold, run.trainer, run.plans,
                                    continue_training=isfile(latest), device=device_for(ctx.device))
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


def predict_run(ctx: BenchmarkContext, run: TrainingRun) -> float:
    """Predict the run's test cases into the method's prediction folder (merged labels); returns seconds."""
    out = prediction_folder(ctx, run.method)
    todo = [c for c in run.test_cases if not isfile(join(out, c + ctx.file_ending))]
    if not todo:
        return 0.0
    t0 = time.time()
    predictor = predictor_for(ctx, run)
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


def check_trained_configs(runs: list[TrainingRun]) -> None:
    """Refuse, before anything trains, a run whose checkpoint on disk was trained with another VerSemi config than
    its trainer class has now (a default changed between two invocations): resuming would report the old model
    under the new method's name, or continue it with other loss terms."""
    import torch

    from nnunetv2_versemi.training.config import VerSemiConfig
    from nnunetv2_versemi.training.warm_start import trainer_class

    problems = []
    for run in runs:
        config = getattr(trainer_class(run.trainer), "config", None)
        if not isinstance(config, VerSemiConfig):
            continue
        for fold in run.folds:
            for name in (CHECKPOINT, "checkpoint_latest.pth"):
                path = join(run.model_folder(), f"fold_{fold}", name)
                if not isfile(path):
                    continue
                trained = (torch.load(path, map_location="cpu", weights_only=False).get("versemi") or {}).get("config")
                if trained is not None and VerSemiConfig.from_dict(trained) != config:
                    problems.append(f"{path}: trained with {VerSemiConfig.from_dict(trained).changes(config)} where "
                                    f"{run.trainer} now has {config.changes(VerSemiConfig.from_dict(trained))}")
                break
    if problems:
        raise BenchmarkError("Checkpoints on disk were trained with another VerSemi config than their trainer has "
                             "now; move them away to retrain, or benchmark the variant that has their config "
                             "(docs/METHOD.md, Variants):\n  " + "\n  ".join(problems))


def train_and_predict(ctx: BenchmarkContext, runs: list[TrainingRun]) -> list[dict]:

    check_trained_configs(runs)
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
    write_json_if_changed(
        join(ctx.pp, union_plans + ".json"), bench_plans(ctx.plans_content, union_plans, ctx.preset)
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
