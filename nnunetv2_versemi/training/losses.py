"""VerSemi loss terms (Lu et al., "Segment Together", TMI 2025, Eq. 2-6), independent of the trainer.

Hard-label terms (L_sup, L_syn, L_spec) use nnU-Net's own Dice + CE with deep supervision, passed in as
``loss`` (what ``nnUNetTrainer._build_loss`` returns). The soft consistency terms (L_unsup, L_cons) are the
official squared soft Dice between probability maps (0 at agreement), summed over deep-supervision scales
with nnU-Net's scale weights; L_unsup skips samples whose target holds (almost) no foreground.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def prompted_supervised_loss(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                             tasks: torch.Tensor, num_classes: Sequence[int],
                             loss: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """Dice + CE of each sample under its own prompt, on its own task's classes.

    logits: per scale (B, max_classes, *S) head outputs of each sample's prompt; targets: per scale
    (B, 1, *S) class indices local to the sample's task; tasks: (B,) task index per sample. Samples are
    grouped by task (each task has its own number of classes); the result is the sample-weighted mean.
    """
    total = logits[0].new_zeros(())
    n = tasks.shape[0]
    for t in torch.unique(tasks).tolist():
        idx = torch.nonzero(tasks == t).flatten()
        c = num_classes[t]
        part = loss([lg[idx, :c] for lg in logits], [tg[idx] for tg in targets])
        total = total + part * (idx.numel() / n)
    return total


def foreground_probability(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """1 - P(background) of a head output (B, >=num_classes, *S) -> (B, *S)."""
    return 1 - torch.softmax(logits[:, :num_classes].float(), dim=1)[:, 0]


def task_foreground(task_logits: torch.Tensor, num_classes: Sequence[int]) -> torch.Tensor:
    """Each task's foreground probability: head outputs of every task (B, T, max_classes, *S) -> (B, T, *S)."""
    return torch.stack([foreground_probability(task_logits[:, t], num_classes[t])
                        for t in range(task_logits.shape[1])], dim=1)


def aggregate_task_foreground(task_logits: torch.Tensor, num_classes: Sequence[int]) -> torch.Tensor:
    """VerSemi's P_agg: element-wise max over the T task prompts of each task's foreground probability.

    task_logits: (B, T, max_classes, *S) -> (B, *S).
    """
    return task_foreground(task_logits, num_classes).max(dim=1).values


def pick_task(per_task: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """(B, T, *S) maps of every task, (B,) task per sample -> (B, 1, *S): each sample's own task's map."""
    idx = tasks.view(-1, 1, *[1] * (per_task.ndim - 2)).expand(-1, 1, *per_task.shape[2:])
    return per_task.gather(1, idx)


def source_task_foreground(task_fg: torch.Tensor, outside_tasks: torch.Tensor, inside_tasks: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
    """P_agg of a CutMix composite from each region's own task head: ``task_fg`` (B, T, *S) foreground
    probabilities of every task head, the tasks of the images outside / inside the box (B,), the box mask
    (B, 1, *S) -> (B, *S). A head never trained on another dataset's images has arbitrary margins there, so
    the max over every head (the paper's P_agg) picks up its false positives."""
    return torch.where(mask > 0.5, pick_task(task_fg, inside_tasks), pick_task(task_fg, outside_tasks))[:, 0]


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                   smooth: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice over the whole batch in VerSemi's official (squared) form,
    1 - (2 sum(p q) + s) / (sum(p^2) + sum(q^2) + s); ``mask`` restricts the region.

    The squared denominator makes the loss 0 whenever ``prob`` equals ``target``, also for soft maps (the
    linear form 1 - 2 sum(p q) / (sum(p) + sum(q)) is not: 0.93 for p = q ~ U(0, 0.1), so it sharpens the
    prediction instead of enforcing agreement).
    """
    prob = prob.float()
    target = target.float()
    if mask is not None:
        mask = mask.float()
        prob = prob * mask
        target = target * mask
    inter = (prob * target).sum()
    denom = (prob * prob).sum() + (target * target).sum()
    return 1 - (2 * inter + smooth) / (denom + smooth)


def foreground_guard(target: torch.Tensor, min_fraction: float, threshold: float = 0.5) -> torch.Tensor:
    """(B, *S) consistency target -> (B,) bool: samples where at least ``min_fraction`` of the voxels are
    confidently foreground (target > ``threshold``). ``min_fraction`` 0 keeps every sample.

    An empty target is trivially matched by an empty prediction: left unguarded, the unlabeled term rewards
    predicting nothing while the task heads (which make P_agg) are still empty.
    """
    if min_fraction <= 0:
        return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
    confident = (target.detach() > threshold).flatten(1).float().mean(dim=1)
    return confident >= min_fraction


def guarded_consistency_loss(prob: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """:func:`soft_dice_loss` over the samples ``keep`` selects; 0 (with a graph) when none is kept."""
    if not bool(keep.any()):
        return prob.sum() * 0.0
    return soft_dice_loss(prob[keep], target[keep])


def deep_supervision_sum(terms: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum of per-scale losses, skipping zero weights (nnU-Net gives the lowest scale weight 0)."""
    out = None
    for term, w in zip(terms, weights):
        if w == 0:
            continue
        out = term * w if out is None else out + term * w
    if out is None:
        raise ValueError("All deep supervision weights are zero")
    return out


def deep_supervision_weights(num_scales: int) -> list[float]:
    """nnU-Net's weights: 1/2^i, lowest resolution 0, normalized to sum 1."""
    if num_scales == 1:
        return [1.0]
    w = [1 / (2**i) for i in range(num_scales)]
    w[-1] = 0
    s = sum(w)
    return [x / s for x in w]


class PresentClassDiceLoss(torch.nn.Module):
    """nnU-Net's soft Dice (``MemoryEfficientSoftDiceLoss`` semantics: softmax input, ``batch_dice``,
    ``do_bg``, ``smooth``), averaged only over the classes present in the target.

    With batch Dice, a class absent from the whole batch scores ``smooth / (sum_pred + smooth)``: any
    prediction of it costs the full Dice of that class, a far stronger push than the reward for finding it
    where it is small. In a union, where each task fills only part of the batch and 2d slices often miss a
    small structure, that push can keep a small class (a lesion) at zero for good. Absent classes still get
    the cross-entropy term. A batch without any present class gives 0.
    """

    def __init__(self, apply_nonlin: Callable | None = None, batch_dice: bool = False, do_bg: bool = True,
                 smooth: float = 1.0, ddp: bool = True):
        super().__init__()
        self.apply_nonlin, self.batch_dice, self.do_bg, self.smooth = apply_nonlin, batch_dice, do_bg, smooth
        self.ddp = ddp

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.apply_nonlin is not None:
            x = self.apply_nonlin(x)
        axes = tuple(range(2, x.ndim))
        with torch.no_grad():
            y = y.view(y.shape[0], 1, *y.shape[1:]) if x.ndim != y.ndim else y
            onehot = torch.zeros_like(x, dtype=torch.float32).scatter_(1, y.long(), 1)
        if not self.do_bg:
            x, onehot = x[:, 1:], onehot[:, 1:]
        if loss_mask is not None:
            x, onehot = x * loss_mask, onehot * loss_mask
        inter = (x * onehot).sum(axes, dtype=torch.float32)
        pred = x.sum(axes, dtype=torch.float32)
        gt = onehot.sum(axes, dtype=torch.float32)
        if self.batch_dice:
            if self.ddp and torch.distributed.is_available() and torch.distributed.is_initialized():
                from nnunetv2.utilities.ddp_allgather import AllGatherGrad

                inter, pred, gt = (AllGatherGrad.apply(t) for t in (inter, pred, gt))
                inter, pred, gt = (t.flatten(0, 1) for t in (inter, pred, gt))
            inter, pred, gt = inter.sum(0), pred.sum(0), gt.sum(0)
        dc = (2 * inter + self.smooth) / (gt + pred + self.smooth).clamp_min(1e-8)
        present = gt > 0
        if not bool(present.any()):
            return x.sum() * 0.0
        return -dc[present].mean()


def dice_ce(batch_dice: bool, ignore_label: int | None, ddp: bool, deep_supervision_scales: int | None,
            gather_dice: bool | None = None, present_classes_only: bool = True) -> torch.nn.Module:
    """nnU-Net's Dice + CE loss (``DC_and_CE_loss`` with the settings of ``nnUNetTrainer._build_loss``) whose
    Dice is :class:`PresentClassDiceLoss` (``present_classes_only``; else nnU-Net's own
    ``MemoryEfficientSoftDiceLoss``), passed through the loss's own ``dice_class`` argument; wrapped in
    nnU-Net's ``DeepSupervisionWrapper`` with nnU-Net's scale weights when ``deep_supervision_scales`` is a
    number of scales (under DDP the lowest scale keeps a tiny weight, as in nnU-Net, so that every output
    receives a gradient). ``gather_dice`` (default: ``ddp``): the batch Dice sums over every rank's batch, as
    nnU-Net's does."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    gather = ddp if gather_dice is None else gather_dice
    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": gather}, {},
                          weight_ce=1, weight_dice=1, ignore_label=ignore_label,
                          dice_class=PresentClassDiceLoss if present_classes_only else MemoryEfficientSoftDiceLoss)
    if deep_supervision_scales is None:
        return loss
    weights = [1 / (2**i) for i in range(deep_supervision_scales)]
    if deep_supervision_scales > 1:
        weights[-1] = 1e-6 if ddp else 0.0
    return DeepSupervisionWrapper(loss, [w / sum(weights) for w in weights])


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_balanced: bool = False
                         ) -> torch.Tensor:
    """Cross-entropy of logits (B, C, *S) against class indices (B, *S), averaged over the voxels whose target
    is >= 0 (-1: no label); 0, with gradient, when no voxel has one. ``class_balanced``: the mean over each
    labelled class's voxels, then over the classes present, so a small structure's few voxels weigh as much as
    the background's many."""
    target = target.long()
    if not class_balanced:
        total = torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=-1, reduction="sum")
        return total / (target >= 0).sum().clamp(min=1)
    per_voxel = torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=-1, reduction="none")
    means = [per_voxel[target == c].mean() for c in torch.unique(target).tolist() if c >= 0]
    return torch.stack(means).mean() if means else logits.sum() * 0.0


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (N, C) logits against (N, C) target distributions (one-hot or mixed), mean over N."""
    return -(target * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
