"""What :mod:`nnunetv2_versemi.benchmark.speed` measures on: synthetic plans (nnU-Net's PlainConvUNet layout
for a patch), fake task tables, trainers initialized in a throw-away nnU-Net folder, the one-pass-per-prompt
reference network, and fixed random batches; and :class:`SpeedError`, the error of every part of it."""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from os.path import join

import numpy as np
import torch
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunetv2_versemi.data.preprocess import unlabeled_folder
from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.tasktable import TABLE_KEY, Task, TaskLabel, TaskTable
from nnunetv2_versemi.training.trainer import VerSemiTrainer


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
