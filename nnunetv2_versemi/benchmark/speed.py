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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import math
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from os.path import join

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunetv2_versemi.data.preprocess import unlabeled_folder
from nnunetv2_versemi.discovery import ensure_ext_trainer_env
from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.nnunet_paths import dataset_name, preprocessed_folder
from nnunetv2_versemi.plans_presets import apply_overlay, load_overlay
from nnunetv2_versemi.tasktable import TABLE_KEY, Task, TaskLabel, TaskTable
from nnunetv2_versemi.training.trainer import VerSemiTrainer

PROG = "nnUNetv2_versemi_benchmark speed"


class SpeedError(VerSemiInputError):
    """Bad input to the speed measurement (dataset, configuration, device, synthetic plans)."""

SYNTH_DATASET = "Dataset999_VerSemiSpeed"


# ---- plans and task tables ------------------------------------------------------------------------------
def _synthetic_topology(patch_size: tuple[int, ...]) -> tuple[list, list]:
    """nnU-Net's pooling strides and conv kernels for ``patch_size`` at isotropic spacing; checks the patch."""
    dim = len(patch_size)
    # nnU-Net's own topology for isotropic spacing: pooling down to a 4-voxel bottleneck edge, 3x3(x3) kernels
    _, strides, kernels, planned_patch, _ = get_pool_and_conv_props([1.0] * dim, list(patch_size), 4, 999999)
    if [int(p) for p in planned_patch] != [int(p) for p in patch_size]:
        raise SpeedError(f"nnU-Net's network topology needs patch_size {list(patch_size)} to be "
                         f"{[int(p) for p in planned_patch]} (divisible by its total pooling)")
    return strides, kernels


def _synthetic_architecture(dim: int, strides: list, kernels: list, base_features: int) -> dict:
    """The ``architecture`` entry: nnU-Net's default PlainConvUNet with features doubling up to the cap."""
    n_stages = len(strides)
    conv = "torch.nn.modules.conv.Conv2d" if dim == 2 else "torch.nn.modules.conv.Conv3d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    cap = 512 if dim == 2 else 320
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": [min(base_features * 2**i, cap) for i in range(n_stages)],
            "conv_op": conv,
            "kernel_sizes": [list(k) for k in kernels],
            "strides": [list(st) for st in strides],
            "n_conv_per_stage": [2] * n_stages,
            "n_conv_per_stage_decoder": [2] * (n_stages - 1),
            "conv_bias": True,
            "norm_op": norm,
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _synthetic_configuration(
    name: str, patch_size: tuple[int, ...], batch_size: int, num_channels: int, architecture: dict
) -> dict:
    """One plans configuration ``name`` for ``patch_size`` at isotropic spacing, unnormalized channels."""
    dim = len(patch_size)
    return {
        "data_identifier": f"nnUNetPlans_{name}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(batch_size),
        "patch_size": [int(p) for p in patch_size],
        "median_image_size_in_voxels": [float(2 * p) for p in patch_size],
        "spacing": [1.0] * dim,
        "normalization_schemes": ["NoNormalization"] * num_channels,
        "use_mask_for_norm": [False] * num_channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "architecture": architecture,
        "batch_dice": True,
    }


def _synthetic_intensity_properties(num_channels: int) -> dict:
    """Foreground intensity properties of ``num_channels`` channels of values in [-1, 1]."""
    return {
        str(c): {
            "max": 1.0,
            "mean": 0.0,
            "median": 0.0,
            "min": -1.0,
            "percentile_00_5": -1.0,
            "percentile_99_5": 1.0,
            "std": 1.0,
        }
        for c in range(num_channels)
    }


def synthetic_plans(
    patch_size: tuple[int, ...] = (64, 64),
    batch_size: int = 4,
    base_features: int = 32,
    num_channels: int = 1,
) -> tuple[dict, str]:
    """An nnU-Net plans dict with one configuration ("2d" or "3d_fullres") of nnU-Net's default PlainConvUNet
    for ``patch_size`` at isotropic spacing: stages and kernels from nnU-Net's ``get_pool_and_conv_props``,
    features doubling up to 512 (2d) / 320 (3d). Returns (plans, configuration name)."""
    dim = len(patch_size)
    if dim not in (2, 3):
        raise SpeedError(f"patch_size must have 2 or 3 entries, got {patch_size}")
    strides, kernels = _synthetic_topology(patch_size)
    name = "2d" if dim == 2 else "3d_fullres"
    architecture = _synthetic_architecture(dim, strides, kernels, base_features)
    config = _synthetic_configuration(name, patch_size, batch_size, num_channels, architecture)
    plans = {
        "dataset_name": SYNTH_DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [2 * p for p in ([1, *patch_size] if dim == 2 else patch_size)],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {name: config},
        "experiment_planner_used": "synthetic (nnunetv2_versemi.benchmark.speed)",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": _synthetic_intensity_properties(num_channels),
    }
    return plans, name


def fake_table(num_tasks: int):
    """A task table of ``num_tasks`` binary tasks named Task0, Task1, ... (only step time is measured)."""
    if num_tasks < 1:
        raise SpeedError(f"need at least one task, got {num_tasks}")
    return TaskTable(
        [
            Task(f"Task{i}", f"Dataset{i:03d}_Task{i}", {"0": "noNorm"}, [TaskLabel("fg", 1, i + 1)])
            for i in range(num_tasks)
        ]
    )


def _dataset_json(table, num_channels: int) -> dict:

    return {
        "channel_names": {str(c): "noNorm" for c in range(num_channels)},
        "labels": table.merged_label_dict(),
        "numTraining": 0,
        "file_ending": ".nii.gz",
        TABLE_KEY: table.to_dict(),
    }


# ---- trainers in a throw-away folder ---------------------------------------------------------------------
@contextlib.contextmanager
def scratch_nnunet_env():
    """nnUNet_preprocessed / nnUNet_results pointing into a temporary folder for the trainers' output."""
    old = {k: os.environ.get(k) for k in ("nnUNet_preprocessed", "nnUNet_results", "nnUNet_raw")}
    with tempfile.TemporaryDirectory(prefix="versemi_speed_") as tmp:
        for k in old:
            os.environ[k] = join(tmp, k)
            os.makedirs(os.environ[k])
        try:
            yield tmp
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _write_scratch_cases(plans: dict, configuration: str, table, num_channels: int) -> None:
    """One preprocessed labeled case and one unlabeled case per task, random, written with nnU-Net's dataset
    class: what ``initialize()`` looks for (the dataset class of the folder, the table's unlabeled cases).
    The steps themselves read the fixed batches of :func:`_prepare`."""
    cm = PlansManager(plans).get_configuration(configuration)
    base = join(os.environ["nnUNet_preprocessed"], plans["dataset_name"])
    shape = [int(p) for p in cm.patch_size]
    shape = [1, *shape] if len(shape) == 2 else shape  # nnU-Net stores 2d data as one-slice volumes
    for folder, cases in ((join(base, cm.data_identifier), [f"{table.tasks[0].name}_l0000"]),
                          (unlabeled_folder(base, cm.data_identifier), [c for t in table.tasks for c in t.unlabeled])):
        os.makedirs(folder, exist_ok=True)
        for c in (c for c in cases if not os.path.isfile(join(folder, c + ".b2nd"))):
            nnUNetDatasetBlosc2.save_case(np.zeros((num_channels, *shape), np.float32), np.zeros((1, *shape), np.int8),
                                          {"spacing": [1.0] * 3, "class_locations": {}}, join(folder, c))


def make_trainer(kind: str, plans: dict, configuration: str, table, num_channels: int, device,
                 trainer: str = "VerSemiTrainer"):
    """An initialized nnUNetTrainer (``kind="nnunet"``) or VerSemi trainer (``"versemi"``, ``"per_prompt"``;
    ``trainer``: the class name, a VerSemiTrainer subclass) on ``plans`` with ``table`` (inside
    :func:`scratch_nnunet_env`)."""
    # one unlabeled case per task in the table (written to the scratch folder); the step reads a fixed batch
    d = table.to_dict()
    table = TaskTable.from_dict({**d, "tasks": [{**t, "unlabeled": [f"{t['name']}_u0000"]} for t in d["tasks"]]})
    plans = copy.deepcopy(plans)
    plans[TABLE_KEY] = table.to_dict()
    plans["continue_training"] = False  # nnU-Net's trainer pops it (get_trainer_from_args sets it)
    _write_scratch_cases(plans, configuration, table, num_channels)
    cls = nnUNetTrainer if kind == "nnunet" else versemi_trainer_class(trainer)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        trainer = cls(plans=plans, configuration=configuration, fold=0,
                      dataset_json=_dataset_json(table, num_channels), device=device)
        trainer.initialize()
    if kind == "per_prompt":
        trainer.network = PerPromptNetwork(trainer.network)
    return trainer


def versemi_trainer_class(name: str) -> type:
    """The VerSemi trainer class of that name, found the way nnU-Net finds trainers."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        cls = recursive_find_trainer_class_by_name(name)
    if cls is None or not issubclass(cls, VerSemiTrainer):
        raise SpeedError(f"{name} is not a VerSemi trainer nnU-Net can find")
    return cls


class PerPromptNetwork(nn.Module):
    """Reference for the official code's cost: one full network pass per prompt.

    Takes the prompt groups :class:`VerSemiNetwork` takes and returns the same outputs, but runs the whole
    network (backbone included) once for every prompt column and every distinct prompt value in it, on the
    samples that carry that value. Gradients flow through every pass, as in the official code.
    """
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def task_prompts(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return self.net.task_prompts(batch_size, device)

    def state_dict(self, *args, **kwargs):
        """The wrapped network's weights (the trainer's EMA teacher copies them by name)."""
        return self.net.state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor, prompts=None, recognition: bool = False):
        if recognition:
            # the official code has no task recognition: constant logits, so the reference's cost stays its own
            out = self.forward(x, prompts)
            return out, x.new_zeros((x.shape[0], self.net.num_tasks))
        if prompts is None:
            return self.net(x)
        single = isinstance(prompts, torch.Tensor)
        groups = [prompts] if single else list(prompts)
        outputs, start = [], 0
        for p in groups:
            xs = x[start : start + p.shape[0]]
            start += p.shape[0]
            columns = []
            for j in range(p.shape[1]):
                col = None
                for v in torch.unique(p[:, j]).tolist():
                    idx = (p[:, j] == v).nonzero().flatten()
                    outs = self.net(xs[idx], torch.full((len(idx), 1), v, dtype=torch.long, device=x.device))
                    if col is None:
                        col = [o.new_zeros((p.shape[0], *o.shape[2:])) for o in outs]
                    col = [c.index_copy(0, idx, o[:, 0]) for c, o in zip(col, outs)]
                columns.append(col)
            outputs.append([torch.stack([c[s] for c in columns], dim=1) for s in range(len(columns[0]))])
        return outputs[0] if single else outputs


def fake_batch(
    trainer, table, batch_size: int, patch: list[int], num_channels: int, device, seed: int = 0
) -> dict:
    """A labeled batch as nnU-Net's loader delivers it (data, target per deep-supervision scale, keys), on
    ``device``; cases alternate between tasks so that CutMix pairs cross tasks as the task-balanced sampler
    makes them."""
    g = torch.Generator().manual_seed(seed)
    tasks = [i % table.num_tasks for i in range(batch_size)]
    keys = [f"{table.tasks[t].name}_{i:04d}" for i, t in enumerate(tasks)]
    data = torch.randn((batch_size, num_channels, *patch), generator=g)
    seg = torch.zeros((batch_size, 1, *patch), dtype=torch.float32)
    for i, t in enumerate(tasks):
        values = torch.tensor([0, *table.tasks[t].merged_values], dtype=torch.float32)
        seg[i] = values[torch.randint(0, len(values), (1, *patch), generator=g)]
    targets = [torch.nn.functional.interpolate(seg, size=shape, mode="nearest").to(device)
               for shape in output_shapes(trainer.network, data[:1].to(device))]
    return {"data": data.to(device), "target": targets, "keys": keys}


@torch.no_grad()
def output_shapes(network: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Spatial shape of each output (deep-supervision scale) of the network's prompt-free forward on ``x``:
    the shapes of the targets nnU-Net's loader delivers for it."""
    out = network(x)
    return [tuple(o.shape[2:]) for o in (out if isinstance(out, (list, tuple)) else [out])]


@dataclass
class Contender:
    name: str
    kind: str  # nnunet | versemi | per_prompt
    num_tasks: int
    trainer: str = "VerSemiTrainer"  # the class of versemi and per_prompt contenders


def _sync(device) -> None:

    if device.type == "cuda":
        torch.cuda.synchronize()


def _prepare(c: Contender, plans: dict, configuration: str, table_for, num_channels: int, device):

    cm = PlansManager(plans).get_configuration(configuration)
    table = table_for(c.num_tasks)
    trainer = make_trainer(c.kind, plans, configuration, table, num_channels, device, c.trainer)
    batch = fake_batch(trainer, table, cm.batch_size, list(cm.patch_size), num_channels, device)
    if c.kind != "nnunet":
        bu = trainer.unlabeled_batch_size or cm.batch_size
        u = {"data": torch.randn((bu, num_channels, *cm.patch_size)).to(device),
             "keys": [f"{table.tasks[i % table.num_tasks].name}_u{i:04d}" for i in range(bu)]}
        trainer.dataloader_unlabeled = itertools.repeat(u)
        # the last epoch, after the switch: lambda > 0 under either schedule, so the step runs the unlabeled
        # branch (stage 2 of the two-stage schedule; the stage-1 step has no unlabeled batch and is cheaper)
        trainer.switch_epoch = 0
        trainer.current_epoch = trainer.num_epochs - 1
        if not trainer.unlabeled_weight() > 0:
            raise ValueError(f"{c.name}: the VerSemi step would skip the unlabeled branch (lambda = 0)")
    return trainer, batch


class RssSampler:
    """Peak resident set size of this process while the ``with`` block runs, sampled from /proc every
    ``interval`` seconds in a thread (torch releases the GIL inside its ops). Where /proc is missing, the
    growth of ``ru_maxrss`` is used instead (which only sees a new all-time peak)."""
    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = self.peak = 0
        self._stop = None

    @staticmethod
    def current() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            v = self.current()
            if v is not None and v > self.peak:
                self.peak = v
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._proc = self.current() is not None
        if self._proc:
            self.baseline = self.peak = self.current()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        else:
            self.baseline = self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self._proc:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.current() or 0)
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


def memory_probe(args: tuple) -> dict:
    """Peak memory growth (MiB) over the resident set before the first step, of ``steps`` training steps of
    one contender on CPU. Run it in a fresh process (what :func:`measure_training` does): memory that an
    earlier contender freed stays in the process and would hide this one's growth."""
    c, plans, configuration, table_spec, num_channels, steps, threads = args
    torch.set_num_threads(threads)
    with scratch_nnunet_env():
        trainer, batch = _prepare(
            c, plans, configuration, _table_factory(table_spec), num_channels, torch.device("cpu")
        )
        with RssSampler() as rss:
            for _ in range(steps):
                trainer.train_step(batch)
    return {"peak_mib": rss.growth_mib}


def _table_factory(spec):
    """``spec``: a task table dict (the dataset's own, used for its task count) or None (fake tables only)."""
    real = TaskTable.from_dict(spec) if spec is not None else None

    def table_for(n: int):
        if real is not None and n == real.num_tasks:
            return real
        return fake_table(n)

    return table_for


def _warm_up(contenders: list[Contender], prepared: dict, warmup: int) -> None:
    """``warmup`` untimed training steps of every contender."""
    for c in contenders:
        tr, batch = prepared[c.name]
        for _ in range(warmup):
            tr.train_step(batch)


def _timed_rounds(contenders: list[Contender], prepared: dict, out: dict, steps: int, device, log) -> None:
    """``steps`` rounds of one timed step per contender, interleaved; appends the times to ``out``."""
    for r in range(steps):
        for c in contenders:
            tr, batch = prepared[c.name]
            _sync(device)
            t0 = time.perf_counter()
            tr.train_step(batch)
            _sync(device)
            out[c.name]["times"].append(time.perf_counter() - t0)
        log(f"round {r + 1}/{steps}: " + ", ".join(f"{k} {v['times'][-1]:.3f}s" for k, v in out.items()))


def _cuda_peak_memory(contenders: list[Contender], prepared: dict, out: dict) -> None:
    """Peak CUDA allocation of one step per contender over the allocation before it, into ``out``."""
    for c in contenders:
        tr, batch = prepared[c.name]
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        tr.train_step(batch)
        torch.cuda.synchronize()
        out[c.name]["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20


def _cpu_peak_memory(
    contenders: list[Contender],
    plans: dict,
    configuration: str,
    table_spec: dict | None,
    num_channels: int,
    warmup: int,
    out: dict,
    log,
) -> None:
    """Peak resident-set growth per contender, each probed by :func:`memory_probe` in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    for c in contenders:
        log(f"memory probe {c.name} (fresh process)")
        with ctx.Pool(1) as pool:
            res = pool.apply(
                memory_probe,
                (
                    (
                        c,
                        plans,
                        configuration,
                        table_spec,
                        num_channels,
                        max(2, warmup),
                        torch.get_num_threads(),
                    ),
                ),
            )
        out[c.name]["peak_mib"] = res["peak_mib"]


def _time_statistics(out: dict) -> None:
    """Median, mean and minimum of each contender's step times, added to its entry."""
    for v in out.values():
        v["median_s"] = statistics.median(v["times"])
        v["mean_s"] = statistics.fmean(v["times"])
        v["min_s"] = min(v["times"])


def measure_training(
    plans: dict,
    configuration: str,
    contenders: list[Contender],
    table_spec: dict | None,
    num_channels: int,
    device,
    warmup: int = 2,
    steps: int = 5,
    memory: bool = True,
    log=print,
) -> dict:
    """Step time (interleaved rounds) and peak memory of each contender; returns {name: {...}}."""
    table_for = _table_factory(table_spec)
    out = {c.name: {"kind": c.kind, "tasks": c.num_tasks, "times": []} for c in contenders}
    with scratch_nnunet_env():
        prepared = {}
        for c in contenders:
            log(f"building {c.name}")
            prepared[c.name] = _prepare(c, plans, configuration, table_for, num_channels, device)
        _warm_up(contenders, prepared, warmup)
        _timed_rounds(contenders, prepared, out, steps, device, log)
        if memory and device.type == "cuda":
            _cuda_peak_memory(contenders, prepared, out)
        del prepared
    if memory and device.type == "cpu":
        _cpu_peak_memory(contenders, plans, configuration, table_spec, num_channels, warmup, out, log)
    _time_statistics(out)
    return out


def measure_prediction(
    plans: dict,
    configuration: str,
    table,
    num_channels: int,
    device,
    image_shape,
    repeats: int = 3,
    tta: bool = False,
    log=print,
) -> dict:
    """Sliding-window time of a plain nnU-Net network vs the VerSemi network (one prompt / all tasks)."""
    plans = copy.deepcopy(plans)
    plans[TABLE_KEY] = table.to_dict()
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    dj = _dataset_json(table, num_channels)
    n_out = table.num_merged_labels
    nets = {
        "nnunet": nnUNetTrainer.build_network_architecture(pm, cm, num_channels, n_out, False),
        "versemi": VerSemiTrainer.build_network_architecture(pm, cm, num_channels, n_out, False),
    }
    predictors = {}
    for k, net in nets.items():
        net = net.to(device).eval()
        p = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=tta,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            allow_tqdm=False,
        )
        p.manual_initialization(
            net, pm, cm, None, dj, "speed", tuple(range(len(cm.patch_size))) if tta else None
        )
        predictors[k] = p
    x = torch.randn((num_channels, *image_shape), generator=torch.Generator().manual_seed(1))
    modes = [("nnunet", "nnunet", None), ("task", "versemi", 0), ("all", "versemi", None)]
    times = {m: [] for m, _, _ in modes}
    with torch.no_grad():
        for r in range(repeats + 1):
            for mode, k, prompt in modes:
                predictors[k].network.prompt = prompt if k == "versemi" else None
                _sync(device)
                t0 = time.perf_counter()
                predictors[k].predict_sliding_window_return_logits(x)
                _sync(device)
                if r > 0:  # the first round warms up
                    times[mode].append(time.perf_counter() - t0)
            if r > 0:
                log(
                    f"prediction round {r}/{repeats}: "
                    + ", ".join(f"{m} {t[-1]:.3f}s" for m, t in times.items())
                )
    nets["versemi"].prompt = None
    return {m: {"times": t, "median_s": statistics.median(t)} for m, t in times.items()}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


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


def training_ratios(args: argparse.Namespace, main_tasks: int, train: dict) -> dict[str, float | None]:
    med = {k: v["median_s"] for k, v in train.items()}
    ratios = {f"versemi@{main_tasks} / nnunet (step time)": _ratio(med[f"versemi@{main_tasks}"], med["nnunet"])}
    scale = sorted(set(args.scale_tasks))
    if len(scale) >= 2:
        lo, hi = scale[0], scale[-1]
        ratios[f"versemi@{hi} / versemi@{lo} (step time)"] = _ratio(med[f"versemi@{hi}"], med[f"versemi@{lo}"])
    if not args.no_reference:
        r = args.ref_tasks
        ratios[f"per_prompt@{r} / versemi@{r} (step time)"] = _ratio(med[f"per_prompt@{r}"], med[f"versemi@{r}"])
    for name in args.trainers:
        ratios[f"{name}@{main_tasks} / nnunet (step time)"] = _ratio(med[f"{name}@{main_tasks}"], med["nnunet"])
    if not args.no_memory:
        ratios[f"versemi@{main_tasks} / nnunet (peak memory)"] = _ratio(
            train[f"versemi@{main_tasks}"].get("peak_mib"), train["nnunet"].get("peak_mib"))
    return ratios


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


def markdown(result: dict) -> str:
    lines = [
        f"Speed: {result['source']}, configuration {result['configuration']}, batch {result['batch_size']}, "
        f"patch {result['patch_size']}, device {result['device']} ({result['threads']} threads, "
        f"{result['cpu_count']} CPUs), {result['steps']} interleaved steps after {result['warmup']} warm-up",
        "",
        "| contender | tasks | median step (s) | min (s) | peak memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, v in result["training"].items():
        mem = v.get("peak_mib")
        lines.append(
            f"| {name} | {v['tasks']} | {v['median_s']:.3f} | {v['min_s']:.3f} | "
            f"{'n/a' if mem is None else f'{mem:.0f}'} |"
        )
    if "prediction" in result:
        p = result["prediction"]
        lines += [
            "",
            f"Sliding window on a {p['image_shape']} image (TTA {'on' if p['tta'] else 'off'}):",
            "",
            "| predictor | median (s) |",
            "|---|---|",
        ]
        for m in ("nnunet", "task", "all"):
            lines.append(f"| {m} | {p[m]['median_s']:.3f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for k, v in result["ratios"].items():
        lines.append(f"| {k} | {'n/a' if v is None else f'{v:.2f}'} |")
    return "\n".join(lines) + "\n"
