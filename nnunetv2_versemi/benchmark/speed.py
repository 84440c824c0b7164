"""``nnUNetv2_versemi_benchmark speed``: training step time, peak memory and prediction time, VerSemi vs nnU-Net.

Training steps are real ``trainer.train_step(batch)`` calls of instantiated trainers (network from each
trainer's ``build_network_architecture``, nnU-Net's loss and optimizer, the VerSemi losses), on the same
plans, batch size and patch, with the data already on the device and no data loading: the labeled batch is a
fixed random tensor with random task-valid labels at every deep-supervision scale, VerSemi's unlabeled loader
is replaced by an iterator that returns a fixed random batch. Contenders:

- ``nnunet``: nnUNetTrainer on the union's merged labels (one forward/backward over the labeled batch B);
- ``versemi@T``: VerSemiTrainer with T tasks, at its last epoch (the unlabeled branch on: stage 2 of the
  two-stage schedule); one backbone pass over [labeled B; labeled mix B/2; unlabeled mix B_u] with the head
  evaluated per prompt (1, 3 and T+1 prompts per group);
- ``per_prompt@T``: the same trainer and losses, but the network is wrapped so that every prompt costs a full
  network pass, as in the official code (labeled images under their own prompt, one pass per task present;
  the labeled mix under the synthetic prompt and under the prompts of its two parts; the unlabeled mix under
  each of the T task prompts and the synthetic prompt).

Task counts other than the dataset's own use fake task tables (one class per task) on the same plans: only
step time is measured. After warm-up, contenders run interleaved, one step each per round, in one process.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the steps minus the allocation before; on
CPU the peak resident set size during the steps (sampled from /proc) minus the resident set before them,
each contender in a fresh spawned process (freed memory stays in a process and would hide the next one's).
tracemalloc does not see torch's allocations, so it is not used.

Prediction: nnU-Net's ``nnUNetPredictor.predict_sliding_window_return_logits`` on the same random images for
a plain nnU-Net network and the VerSemi network under one task's prompt (``--task``) and without prompt
(``all``), networks of the same plans with random weights.

Without ``-d`` the plans are synthetic (built in code: nnU-Net's PlainConvUNet layout for ``--patch``).
Nothing is written to ``$nnUNet_preprocessed`` or ``$nnUNet_results``: trainers run in a temporary folder.

The parts have modules of their own: :mod:`~nnunetv2_versemi.benchmark.speed_inputs` (plans, task tables,
trainers and batches), :mod:`~nnunetv2_versemi.benchmark.speed_measure` (the measurements) and
:mod:`~nnunetv2_versemi.benchmark.speed_report` (ratios and markdown); this module turns the command's arguments
into a run.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from os.path import join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

# ``name as name``: re-exported, the benchmark commands and tests use them as speed.<name>
from nnunetv2_versemi.benchmark.speed_inputs import PerPromptNetwork as PerPromptNetwork
from nnunetv2_versemi.benchmark.speed_inputs import SpeedError, scratch_nnunet_env, synthetic_plans
from nnunetv2_versemi.benchmark.speed_inputs import fake_table as fake_table
from nnunetv2_versemi.benchmark.speed_inputs import versemi_trainer_class as versemi_trainer_class
from nnunetv2_versemi.benchmark.speed_measure import (
    Contender,
    _table_factory,
    measure_prediction,
    measure_training,
)
from nnunetv2_versemi.benchmark.speed_measure import memory_probe as memory_probe
from nnunetv2_versemi.benchmark.speed_report import _ratio, training_ratios
from nnunetv2_versemi.benchmark.speed_report import markdown as markdown
from nnunetv2_versemi.discovery import ensure_ext_trainer_env
from nnunetv2_versemi.nnunet_paths import dataset_name, preprocessed_folder
from nnunetv2_versemi.plans_presets import apply_overlay, load_overlay
from nnunetv2_versemi.tasktable import TaskTable

PROG = "nnUNetv2_versemi_benchmark speed"


@dataclass
class SpeedSetup:
    """What the contenders are measured on: plans and configuration, the task table (None: fake tables),
    the dataset's own task count and channels, and a line saying where the plans come from."""
    plans: dict
    configuration: str
    table_spec: dict | None
    main_tasks: int
    num_channels: int
    source: str


def speed_setup(args: argparse.Namespace) -> SpeedSetup:
    """The plans of ``-d`` (with ``--plans-preset``), or synthetic plans for ``--patch``."""
    if args.d is None:
        plans, configuration = synthetic_plans(tuple(args.patch), args.batch_size, args.features)
        return SpeedSetup(plans, configuration, None, args.main_tasks, 1,
                          f"synthetic plans, patch {args.patch}, batch {args.batch_size}")
    name = dataset_name(args.d)
    pp = preprocessed_folder(name)
    plans = load_json(join(pp, args.p + ".json"))
    if args.plans_preset:
        plans = apply_overlay(plans, load_overlay(args.plans_preset))
    if args.c not in plans["configurations"]:
        raise SpeedError(f"Configuration {args.c} not in {args.p}.json of {name}")
    if args.batch_size is not None:
        plans["configurations"][args.c]["batch_size"] = args.batch_size
    table = TaskTable.from_plans(plans)
    return SpeedSetup(plans, args.c, table.to_dict(), table.num_tasks,
                      len(load_json(join(pp, "dataset.json"))["channel_names"]),
                      f"{name} {args.p}.json" + (f" + preset {args.plans_preset}" if args.plans_preset else ""))


def contenders_for(args: argparse.Namespace, main_tasks: int) -> list[Contender]:
    """nnU-Net, VerSemi at the dataset's task count and at every ``--scale-tasks`` count, and (unless
    ``--no-reference``) the one-pass-per-prompt reference at ``--ref-tasks``."""
    out = [Contender("nnunet", "nnunet", main_tasks), Contender(f"versemi@{main_tasks}", "versemi", main_tasks)]
    out += [Contender(f"versemi@{t}", "versemi", t) for t in sorted({*args.scale_tasks, args.ref_tasks} - {main_tasks})]
    if not args.no_reference:
        out.append(Contender(f"per_prompt@{args.ref_tasks}", "per_prompt", args.ref_tasks))
    out += [Contender(f"{name}@{main_tasks}", "versemi", main_tasks, name) for name in args.trainers]
    return out


def run_speed(args: argparse.Namespace, log=print) -> dict:
    """Training step times (and peak memory) of the contenders, then prediction times; returns the results
    with their ratios."""
    ensure_ext_trainer_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpeedError("-device cuda: no CUDA device (use -device cpu)")
    setup = speed_setup(args)
    cm = PlansManager(setup.plans).get_configuration(setup.configuration)
    contenders = contenders_for(args, setup.main_tasks)
    log(f"{setup.source}: configuration {setup.configuration}, batch {cm.batch_size}, patch {list(cm.patch_size)}, "
        f"device {device}, {torch.get_num_threads()} threads; contenders: {', '.join(c.name for c in contenders)}")
    train = measure_training(setup.plans, setup.configuration, contenders, setup.table_spec, setup.num_channels,
                             device, args.warmup, args.steps, not args.no_memory, log)
    result = {"command": " ".join(["nnUNetv2_versemi_benchmark", *(getattr(args, "argv", None) or ["speed"])]),
              "source": setup.source, "configuration": setup.configuration, "batch_size": cm.batch_size,
              "patch_size": list(cm.patch_size), "device": str(device), "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "warmup": args.warmup, "steps": args.steps, "training": train}
    ratios = training_ratios(args, setup.main_tasks, train)
    if not args.no_prediction:
        table = _table_factory(setup.table_spec)(setup.main_tasks)
        patch = list(cm.patch_size)
        shape = [args.slices, *[2 * p for p in patch]] if len(patch) == 2 else [2 * p for p in patch]
        with scratch_nnunet_env():
            pred = measure_prediction(setup.plans, setup.configuration, table, setup.num_channels, device, shape,
                                      args.pred_repeats, args.tta, log)
        result["prediction"] = {"image_shape": shape, "tta": args.tta, **pred}
        ratios["predict --task / nnunet"] = _ratio(pred["task"]["median_s"], pred["nnunet"]["median_s"])
        ratios["predict all / nnunet"] = _ratio(pred["all"]["median_s"], pred["nnunet"]["median_s"])
    result["ratios"] = ratios
    return result
