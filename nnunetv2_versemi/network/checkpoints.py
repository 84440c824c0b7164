"""Network weights of earlier versions, converted to the current layout before they load.

Two earlier layouts exist:

- **no task classifier** (trained before task recognition): the network's own initial classifier state is added
  (its linear layer is zero: uniform output) and prompt-free prediction routes to every task head, the most
  confident task winning per voxel (``routing = "all_heads"``);
- **a task classifier that reads the pooled bottleneck only** (the first recognition layout): its weights become
  the bottleneck columns of the every-stage classifier and the other stages get weight 0, so the network
  recognises exactly as the checkpoint did.

Only the state dict is converted; the network's architecture stays what its trainer built. Each conversion is
described by a :class:`CheckpointNotice` (a warning): the trainer writes them to nnU-Net's training log, a
predictor shows them as warnings.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

CLASSIFIER = "task_classifier."
STANDARDIZE, LINEAR = f"{CLASSIFIER}0.", f"{CLASSIFIER}1."


class CheckpointNotice(UserWarning):
    """A checkpoint of an earlier version was converted to the current network layout."""


@dataclass
class Converted:
    """A state dict in the current layout, the routing it needs (None: the network's own) and what was done."""

    state_dict: dict
    routing: str | None = None
    notes: list[str] = field(default_factory=list)


def convert_state_dict(network: nn.Module, state_dict: dict) -> Converted:
    """``state_dict`` in ``network``'s layout (a VerSemiNetwork's); a dict already in it comes back as is."""
    own = network.task_classifier.state_dict()
    has_classifier = any(k.startswith(CLASSIFIER) for k in state_dict)
    if not has_classifier:
        converted = dict(state_dict)
        converted.update({CLASSIFIER + k: v.clone() for k, v in own.items()})
        return Converted(converted, "all_heads", [
            "VerSemi: this checkpoint has no task classifier (trained before task recognition): prompt-free "
            "prediction runs every task head, the most confident task wins per voxel"])
    weight = state_dict.get(LINEAR + "weight")
    n_in = own["1.weight"].shape[1]
    if weight is None or weight.shape[1] == n_in:
        return Converted(state_dict)
    bottleneck = network._stage_channels[-1]
    if network.recognition_input != "stages" or weight.shape[1] != bottleneck:
        raise RuntimeError(f"The checkpoint's task classifier reads {weight.shape[1]} features; this network's "
                           f"reads {n_in} ({network.recognition_input}) and no conversion between them exists")
    return Converted(_bottleneck_to_stages(state_dict, own, bottleneck), None, [
        "VerSemi: this checkpoint's task classifier reads the pooled bottleneck only (trained before the "
        "classifier read every encoder stage): converted to the every-stage layout with the other stages at "
        "weight 0, it recognises as trained"])


def _bottleneck_to_stages(state_dict: dict, own: dict, bottleneck: int) -> dict:
    """The bottleneck-only classifier as the last ``bottleneck`` input columns of the every-stage one. Its
    standardisation scales by 1/sqrt(C): the weights are rescaled by sqrt(C_all / C_bottleneck) so that the
    logits stay the same."""
    n_in = own["1.weight"].shape[1]
    cols = slice(n_in - bottleneck, n_in)
    converted = dict(state_dict)
    old_w = state_dict[LINEAR + "weight"]
    w = torch.zeros(old_w.shape[0], n_in, dtype=old_w.dtype, device=old_w.device)
    w[:, cols] = old_w * (n_in / bottleneck) ** 0.5
    converted[LINEAR + "weight"] = w
    for name in ("running_mean", "running_var"):
        full = own[f"0.{name}"].clone().to(device=old_w.device)
        full[cols] = state_dict[STANDARDIZE + name]
        converted[STANDARDIZE + name] = full
    return converted


def drop_mismatched_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Forget the optimizer state (momentum, Adam's moments) of parameters whose state no longer has their
    shape (a converted classifier); returns how many parameters lost theirs."""
    dropped = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if any(torch.is_tensor(v) and v.ndim > 0 and v.shape != p.shape for v in state.values()):
                del optimizer.state[p]
                dropped += 1
    return dropped


@contextlib.contextmanager
def logged_checkpoint_notices(log: Callable[[str], None]) -> Iterator[None]:
    """Within the block, checkpoint notices go to ``log`` (a trainer's ``print_to_log_file``: nnU-Net's training
    log); other warnings are shown as usual."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointNotice)
        yield
    for w in caught:
        if issubclass(w.category, CheckpointNotice):
            log(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
