"""nnU-Net's DDP as VerSemi uses it: the unlabeled batch split like the labeled one, and CPU process groups (gloo)
for the tests."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP


def split_global_batch(global_batch: int, world_size: int, rank: int) -> int:
    """This rank's share of a global batch, distributed the way nnU-Net distributes its labeled batch."""
    if global_batch < world_size:
        raise ValueError(f"Batch size {global_batch} is smaller than the number of GPUs ({world_size})")
    return global_batch // world_size + (1 if rank < global_batch % world_size else 0)


@contextlib.contextmanager
def cpu_ddp_without_device_ids(device: torch.device):
    """nnU-Net's ``initialize`` wraps the network in ``DDP(network, device_ids=[rank])``, which only a CUDA module
    accepts; a CPU module (a gloo process group) must come without device ids. nnU-Net has no hook for the
    wrapper, so its module's ``DDP`` name is swapped for the call."""
    if device.type == "cuda":
        yield
        return
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

    def cpu_ddp(module, device_ids=None, **kwargs):
        return DDP(module, **kwargs)

    nnunet_trainer_module.DDP = cpu_ddp
    try:
        yield
    finally:
        nnunet_trainer_module.DDP = DDP
