"""``nnUNetv2_versemi_benchmark recognition``: stock (prompt-free) prediction against prompted prediction.

On a trained union model and the union's labeled test cases (imagesTs/labelsTs, union format), every case is
preprocessed once and predicted three ways by the same network:
  prompted    under its own task's prompt (what ``nnUNetv2_versemi_predict --task`` and the benchmark score);
  recognised  prompt-free, each patch routed to the task the classifier recognises (stock nnUNetv2_predict);
  all_heads   prompt-free, every task head, the most confident task wins (the behaviour before recognition).
Reports Dice per task of each, the case-level recognition accuracy (mean probability over the case's patches)
and the prediction time of ``recognised`` against ``all_heads``, measured case by case, interleaved. Writes
recognition.json and recognition.md to the output folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from os.path import join

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from tqdm import tqdm

from nnunetv2_versemi.benchmark.methods import BenchmarkError
from nnunetv2_versemi.benchmark.preparation import labeled_test_cases
from nnunetv2_versemi.evaluation.evaluate import evaluate_folders
from nnunetv2_versemi.inference.predict import (
    check_folds,
    load_model_table,
    make_predictor,
    resolve_model_folder,
)
from nnunetv2_versemi.nnunet_paths import link_or_copy, raw_folder
from nnunetv2_versemi.tasktable import TaskTable

MODES = ("prompted", "recognised", "all_heads")
PROG = "nnUNetv2_versemi_benchmark recognition"


def _predict_case(predictor, net, data: torch.Tensor, mode: str, task: int) -> tuple[np.ndarray, float, list]:
    """Logits of one preprocessed case under one mode, the seconds it took, and (recognised) the per-patch
    task probabilities the network saw."""
    with net.prompted(task if mode == "prompted" else None, "all_heads" if mode == "all_heads" else "recognised"), \
            net.recording_task_probabilities() as seen:
        t0 = time.perf_counter()
        logits = predictor.predict_sliding_window_return_logits(data)
        seconds = time.perf_counter() - t0
    return logits, seconds, [p.cpu().numpy() for p in seen]


def _load_model(args: argparse.Namespace) -> tuple[str, TaskTable, list[str], nnUNetPredictor, torch.nn.Module]:
    """The model folder, its task table, the one fold, and a predictor with its network (checks the classifier)."""
    model = resolve_model_folder(args.d, args.c, args.tr, args.p)
    table = load_model_table(model)
    folds = [str(f) for f in args.f]
    if len(folds) != 1:
        raise BenchmarkError(f"Give one fold (-f), got {len(folds)}: the modes are timed on one network")
    check_folds(model, folds, args.chk)
    predictor, net = make_predictor(model, folds, args.chk, 0.5, not args.disable_tta, torch.device(args.device))
    if net.routing != "recognised":
        raise BenchmarkError(f"The model in {model} has no task classifier (trained before task recognition)")
    return model, table, folds, predictor, net


def _reference_folder(out: str, raw: str, cases: list[str], fe: str) -> str:
    """``out``/reference with the labels of exactly the scored cases (labelsTs may hold others)."""
    ref = join(out, "reference")
    os.makedirs(ref, exist_ok=True)
    for c in cases:
        if not os.path.isfile(join(ref, c + fe)):
            link_or_copy(join(raw, "labelsTs", c + fe), join(ref, c + fe))
    return ref


def _case_recognition(table: TaskTable, task: int, seen: list) -> dict:
    """The case's task, the task recognised from its mean patch probabilities, and the share of patches right."""
    mean = np.concatenate(seen).mean(0)
    return {"task": table.tasks[task].name,
            "recognised": table.tasks[int(mean.argmax())].name,
            "probability": round(float(mean.max()), 4),
            "patches_recognised": float(np.mean(np.concatenate(seen).argmax(1) == task))}


def _predict_cases(
    args: argparse.Namespace, predictor, net, table: TaskTable, raw: str, cases: list[str]
) -> tuple[dict, dict]:
    """Every case preprocessed once and predicted under each mode (order alternating), exported to ``args.o``/mode;
    returns the seconds per mode and the recognition per case."""
    dataset_json, pm, cm = predictor.dataset_json, predictor.plans_manager, predictor.configuration_manager
    fe = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    preprocessor = cm.preprocessor_class(verbose=False)
    os.makedirs(args.o, exist_ok=True)
    for mode in MODES:
        os.makedirs(join(args.o, mode), exist_ok=True)
    seconds = {m: [] for m in MODES}
    recognition = {}
    net.load_state_dict(predictor.list_of_parameters[0])
    for case in tqdm(cases, desc="Predicting test cases three ways"):
        files = [join(raw, "imagesTs", f"{case}_{k:04d}{fe}") for k in range(n_channels)]
        data, _, props = preprocessor.run_case(files, None, pm, cm, dataset_json)
        data = torch.from_numpy(data).float()
        task = table.task_of_case(case)
        order = list(MODES) if len(seconds["prompted"]) % 2 == 0 else list(reversed(MODES))
        for mode in order:
            logits, sec, seen = _predict_case(predictor, net, data, mode, task)
            seconds[mode].append(sec)
            export_prediction_from_logits(logits, props, cm, pm, dataset_json, join(args.o, mode, case), False)
            if mode == "recognised":
                recognition[case] = _case_recognition(table, task, seen)
    return seconds, recognition


def _dice_per_mode(ref: str, out: str, table: TaskTable) -> dict:
    """Mean Dice per task of each mode's predictions against ``ref`` (evaluations in ``out``/eval_<mode>)."""
    dice = {}
    for mode in MODES:
        res = evaluate_folders(ref, join(out, mode), table, num_processes=1,
                               output_dir=join(out, f"eval_{mode}"))
        dice[mode] = {t: agg["mean_over_classes"]["dice"]["mean"] for t, agg in res["tasks"].items()}
    return dice


def _recognition_accuracy(table: TaskTable, recognition: dict) -> dict:
    """Per task: share of its cases recognised as it, mean share of patches recognised, number of cases."""
    accuracy = {}
    for t in table.tasks:
        own = [r for r in recognition.values() if r["task"] == t.name]
        accuracy[t.name] = {
            "cases": float(np.mean([r["recognised"] == t.name for r in own])) if own else None,
            "patches": float(np.mean([r["patches_recognised"] for r in own])) if own else None,
            "n_cases": len(own)}
    return accuracy


def run_recognition(args: argparse.Namespace) -> dict:
    model, table, folds, predictor, net = _load_model(args)
    dataset_json, pm = predictor.dataset_json, predictor.plans_manager
    raw = raw_folder(pm.dataset_name)
    fe = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    cases = [c for group in labeled_test_cases(raw, table, fe, n_channels).values() for c in group]
    ref = _reference_folder(args.o, raw, cases, fe)
    seconds, recognition = _predict_cases(args, predictor, net, table, raw, cases)
    dice = _dice_per_mode(ref, args.o, table)
    accuracy = _recognition_accuracy(table, recognition)
    ratio = np.array(seconds["recognised"]) / np.array(seconds["all_heads"])
    result = {
        "command": " ".join(["nnUNetv2_versemi_benchmark", *(getattr(args, "argv", None) or sys.argv[1:])]),
        "model": model, "folds": folds, "tta": not args.disable_tta, "n_cases": len(cases),
        "device": args.device, "dice": dice,
        "stock_minus_prompted": {t: dice["recognised"][t] - dice["prompted"][t] for t in dice["prompted"]},
        "recognition_accuracy": accuracy,
        "time_ratio_recognised_vs_all_heads": {"median": float(np.median(ratio)),
                                               "total": float(sum(seconds["recognised"]) / sum(seconds["all_heads"]))},
        "seconds": {m: float(sum(v)) for m, v in seconds.items()},
        "cases": recognition,
    }
    save_json(result, join(args.o, "recognition.json"), sort_keys=False)
    with open(join(args.o, "recognition.md"), "w") as f:
        f.write(recognition_markdown(result))
    print(recognition_markdown(result))
    return result


def recognition_markdown(result: dict) -> str:
    tasks = list(result["dice"]["prompted"])
    lines = ["| task | prompted | stock (recognised) | stock − prompted | all heads (old) | cases recognised "
             "| patches recognised |", "|---|---|---|---|---|---|---|"]
    for t in tasks:
        acc = result["recognition_accuracy"][t]
        lines.append(
            f"| {t} | {result['dice']['prompted'][t]:.3f} | {result['dice']['recognised'][t]:.3f} | "
            f"{result['stock_minus_prompted'][t]:+.3f} | {result['dice']['all_heads'][t]:.3f} | "
            f"{acc['cases']:.0%} of {acc['n_cases']} | {acc['patches']:.1%} |")
    r = result["time_ratio_recognised_vs_all_heads"]
    lines.append("")
    lines.append(f"Prediction time, recognised / all heads: median {r['median']:.2f} per case, "
                 f"{r['total']:.2f} in total ({result['n_cases']} cases, {result['device']}).")
    return "\n".join(lines) + "\n"
