"""The EMA teacher: a copy of the student without gradient whose weights follow the student's, and the head
predictions either network gives the unlabeled terms their targets from."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


class EMATeacher:
    """teacher = alpha teacher + (1 - alpha) student after every optimizer step."""

    def __init__(self, student: nn.Module, alpha: float):
        self.network = copy.deepcopy(student).eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.alpha = alpha

    def follow(self, student: nn.Module) -> None:
        """Start again as the student (a fresh run after nnU-Net loaded pretrained weights into it)."""
        self.network.load_state_dict(student.state_dict())

    @torch.no_grad()
    def update(self, student: nn.Module, sync_buffers: Callable[[], None] | None = None) -> None:
        """One EMA step for floating-point tensors (one fused op over all of them), copies of the others (e.g.
        BatchNorm's counters). Each tensor once: nnU-Net's decoder holds its encoder, so the state dict lists the
        encoder's tensors under several keys. ``sync_buffers`` (DDP) first makes the student's buffers rank 0's:
        each rank's forward updated them with its own batch, and DDP broadcasts them only at the next forward,
        after the teacher would have averaged in a different value on every rank."""
        if sync_buffers is not None:
            sync_buffers()
        state = student.state_dict()
        floats, targets, seen = [], [], set()
        for k, v in self.network.state_dict(keep_vars=True).items():  # the tensors themselves: shared ones alike
            if id(v) in seen:
                continue
            seen.add(id(v))
            if v.dtype.is_floating_point:
                floats.append(v)
                targets.append(state[k].detach())
            else:
                v.copy_(state[k])
        torch._foreach_lerp_(floats, targets, 1 - self.alpha)

    def state_dict(self) -> dict:
        return self.network.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state)


@torch.no_grad()
def every_head(net: nn.Module, images: list[torch.Tensor | None], autocast) -> list[list[torch.Tensor] | None]:
    """Every task head's output (per scale, (B, T, classes, *S)) on each of ``images`` (None: not asked), in one
    forward pass of ``net`` (the teacher, or the student without gradient); ``autocast``: the context to run in."""
    groups = [x for x in images if x is not None]
    x = torch.cat(groups)
    with autocast():
        out = net(x, net.task_prompts(x.shape[0], x.device))
    per_scale = [o.split([g.shape[0] for g in groups]) for o in (out if isinstance(out, (list, tuple)) else [out])]
    results, i = [], 0
    for image in images:
        results.append(None if image is None else [parts[i] for parts in per_scale])
        i += image is not None
    return results
