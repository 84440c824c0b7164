"""The input groups of one VerSemi step, named: the labeled batch, the labeled CutMix and the unlabeled CutMix,
each with its prompts, its task-recognition target and the targets its loss terms need.

The network takes the groups in one backbone pass, each with its own prompts (one column per head it runs), and
returns per group, per deep-supervision scale, logits (B, prompts, classes, *S). Which prompt sits in which column
is decided here and read back here, through the accessors of each group: nothing else indexes groups or prompt
columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nnunetv2_versemi.training import cutmix, losses


def area_mixed_tasks(outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor, num_tasks: int
                     ) -> torch.Tensor:
    """Task distribution of CutMix composites: each part's task weighted by its share of the patch (as CutMix
    mixes class labels). outside/inside (N,) task ids, mask (N, 1, *S) with 1 inside the box."""
    area = mask.flatten(1).float().mean(1, keepdim=True)
    return (1 - area) * F.one_hot(outside, num_tasks).float() + area * F.one_hot(inside, num_tasks).float()


@dataclass
class LabeledBatch:
    """The labeled batch under each case's own task prompt, with its targets per deep-supervision scale: the
    task's local classes (L_sup) and any foreground (L_syn's parts)."""
    x: torch.Tensor
    tasks: torch.Tensor
    local: list[torch.Tensor]
    fg: list[torch.Tensor]
    num_tasks: int

    @property
    def prompts(self) -> torch.Tensor:
        return self.tasks[:, None]

    @property
    def rec_target(self) -> torch.Tensor:
        return F.one_hot(self.tasks, self.num_tasks).float()

    @staticmethod
    def own_prompt(outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per scale, (B, classes, *S): each case's logits under its own task's prompt."""
        return [o[:, 0] for o in outs]


@dataclass
class LabeledMix:
    """The labeled CutMix: halves a and b of the labeled batch, a outside the box and b inside. Prompts: the
    synthetic task, a's task, b's task. Targets per scale: L_syn's (either part's foreground) and L_spec's (a's
    classes outside the box, b's inside; both where a and b share their task)."""
    x: torch.Tensor
    prompts: torch.Tensor
    rec_target: torch.Tensor
    tasks_a: torch.Tensor
    tasks_b: torch.Tensor
    syn: list[torch.Tensor]
    spec_a: list[torch.Tensor]
    spec_b: list[torch.Tensor]

    @staticmethod
    def synthetic(outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per scale, the synthetic prompt's (background, foreground) logits."""
        return [o[:, 0, :2] for o in outs]

    @staticmethod
    def outside_task(outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per scale, the logits under the task of the image outside the box (a)."""
        return [o[:, 1] for o in outs]

    @staticmethod
    def inside_task(outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per scale, the logits under the task of the image inside the box (b)."""
        return [o[:, 2] for o in outs]


def labeled_mix(batch: LabeledBatch, ratio: tuple[float, float], synthetic_prompt: int) -> LabeledMix | None:
    """The labeled CutMix of ``batch``'s two halves (None for a batch of one), boxes of side ratio ``ratio``."""
    data, tasks = batch.x, batch.tasks
    half = data.shape[0] // 2
    if half == 0:
        return None
    a, b = slice(0, half), slice(half, 2 * half)
    spatial = data.shape[2:]
    m = cutmix.box_masks(cutmix.draw_boxes(half, spatial, ratio), spatial, data.device)
    ms = [cutmix.resize_mask(m, f.shape[2:]) for f in batch.fg]
    same = (tasks[a] == tasks[b]).view(-1, *[1] * (data.ndim - 1))
    both = [cutmix.mix(lc[a], lc[b], mm) for lc, mm in zip(batch.local, ms)]
    return LabeledMix(
        x=cutmix.mix(data[a], data[b], m),
        prompts=torch.stack((torch.full_like(tasks[a], synthetic_prompt), tasks[a], tasks[b]), dim=1),
        rec_target=area_mixed_tasks(tasks[a], tasks[b], m, batch.num_tasks),
        tasks_a=tasks[a], tasks_b=tasks[b],
        syn=[cutmix.mix(f[a], f[b], mm) for f, mm in zip(batch.fg, ms)],
        spec_a=[torch.where(same, y, cutmix.mix(lc[a], torch.zeros_like(lc[a]), mm))
                for y, lc, mm in zip(both, batch.local, ms)],
        spec_b=[torch.where(same, y, cutmix.mix(torch.zeros_like(lc[b]), lc[b], mm))
                for y, lc, mm in zip(both, batch.local, ms)])


@dataclass
class UnlabeledMix:
    """The unlabeled CutMix: image ``u`` outside the box, its partner (the next unlabeled image, or a labeled
    one) inside. Prompts: either every task (when the student's own heads make P_agg) or the two regions' own
    tasks, then the synthetic task. The targets come later, from the teacher: L_pseudo's labels (outside
    image's task, inside image's task) and every task's foreground on the mix (P_agg's parts)."""
    x: torch.Tensor
    u: torch.Tensor
    partner: torch.Tensor
    mask: torch.Tensor
    tasks: torch.Tensor
    partner_tasks: torch.Tensor
    partner_idx: torch.Tensor | None  # index of the labeled partner in the labeled batch (partner "labeled")
    prompts: torch.Tensor
    rec_target: torch.Tensor
    every_task_head: bool
    pseudo: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    task_fg: list[torch.Tensor] | None = None  # per scale (B, T, *S): the teacher's, when it makes P_agg

    def unmixed_images(self) -> torch.Tensor:
        """The images the mix was cut from, once each: the unlabeled batch (its partners are the same images,
        rolled by one), or the unlabeled batch followed by its labeled partners."""
        return self.u if self.partner_idx is None else torch.cat((self.u, self.partner))

    def own_and_partner(self, per_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps of :meth:`unmixed_images` -> those of the images outside and inside the boxes."""
        n = self.u.shape[0]
        if self.partner_idx is None:
            return per_image, per_image.roll(1, dims=0)
        return per_image[:n], per_image[n:]

    def cut(self, per_image: torch.Tensor) -> torch.Tensor:
        """Maps of :meth:`unmixed_images`, CutMixed with the mix's box, as the input was."""
        return cutmix.mix(*self.own_and_partner(per_image), cutmix.resize_mask(self.mask, per_image.shape[2:]))

    def box(self, spatial_shape) -> torch.Tensor:
        return cutmix.resize_mask(self.mask, spatial_shape)

    @staticmethod
    def synthetic(outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per scale, the synthetic prompt's logits (its column comes last)."""
        return [o[:, -1] for o in outs]

    def every_task(self, outs: list[torch.Tensor], num_tasks: int) -> list[torch.Tensor]:
        """Per scale, (B, T, classes, *S): every task head's logits (only when ``every_task_head``)."""
        assert self.every_task_head, "the student ran only the regions' own task heads"
        return [o[:, :num_tasks] for o in outs]

    def region_task(self, outs: list[torch.Tensor], inside: bool) -> list[torch.Tensor]:
        """Per scale, the logits under the task of the image outside (or inside) the box."""
        if not self.every_task_head:
            return [o[:, int(inside)] for o in outs]
        rows = torch.arange(self.tasks.shape[0], device=self.tasks.device)
        tasks = self.partner_tasks if inside else self.tasks
        return [o[rows, tasks] for o in outs]


def unlabeled_mix(u: torch.Tensor, u_tasks: torch.Tensor, labeled: LabeledBatch, ratio: tuple[float, float],
                  partner: str, every_task_head: bool, synthetic_prompt: int) -> UnlabeledMix:
    """The CutMix of the unlabeled images ``u`` with a partner (``partner``: "unlabeled" the next image of the
    batch, "labeled" a random image of the labeled batch), boxes of side ratio ``ratio``."""
    device, spatial = u.device, u.shape[2:]
    mu = cutmix.box_masks(cutmix.draw_boxes(u.shape[0], spatial, ratio), spatial, device)
    partner_idx = None
    if partner == "labeled":
        partner_idx = torch.randint(0, labeled.x.shape[0], (u.shape[0],), device=device)
        other, partner_tasks = labeled.x[partner_idx], labeled.tasks[partner_idx]
    else:
        other, partner_tasks = u.roll(1, dims=0), u_tasks.roll(1, dims=0)
    num_tasks = labeled.num_tasks
    synthetic = torch.full((u.shape[0], 1), synthetic_prompt, device=device)
    if every_task_head:
        heads = torch.arange(num_tasks, device=device)[None].expand(u.shape[0], -1)
    else:
        heads = torch.stack((u_tasks, partner_tasks), dim=1)
    return UnlabeledMix(x=cutmix.mix(u, other, mu), u=u, partner=other, mask=mu, tasks=u_tasks,
                        partner_tasks=partner_tasks, partner_idx=partner_idx,
                        prompts=torch.cat((heads, synthetic), dim=1),
                        rec_target=area_mixed_tasks(u_tasks, partner_tasks, mu, num_tasks),
                        every_task_head=every_task_head)


def confident_labels(logits: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Hard labels of one head's logits (B, C, *S); -1 where their probability is below ``threshold``."""
    if threshold is None:
        return logits.argmax(1)
    conf, labels = torch.softmax(logits.float(), 1).max(1)
    return torch.where(conf >= threshold, labels, torch.full_like(labels, -1))


def pseudo_targets(mix: UnlabeledMix, unmixed: list[torch.Tensor], num_classes: list[int],
                   threshold: float | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """L_pseudo's targets: every task head's hard labels on the unmixed images (``unmixed``: per scale
    (B', T, classes, *S)), CutMixed with the mix's box. Returns, per scale, the targets under the outside image's
    task and under the inside image's task, (B, 1, *S) each, in that task's local classes (-1: not confident).
    ``num_classes``: per task (without the synthetic one)."""
    outside, inside = [], []
    for o in unmixed:
        own, other = mix.own_and_partner(
            torch.stack([confident_labels(o[:, t, :c], threshold) for t, c in enumerate(num_classes)], dim=1))
        m = mix.box(o.shape[3:])
        for tasks, store in ((mix.tasks, outside), (mix.partner_tasks, inside)):
            store.append(cutmix.mix(losses.pick_task(own, tasks), losses.pick_task(other, tasks), m))
    return outside, inside


@dataclass
class StepGroups:
    """The input groups of one backbone pass, in the order the network receives them."""
    labeled: LabeledBatch
    labeled_mix: LabeledMix | None = None
    unlabeled_mix: UnlabeledMix | None = None

    def _groups(self) -> list:
        return [g for g in (self.labeled, self.labeled_mix, self.unlabeled_mix) if g is not None]

    def forward(self, network) -> tuple[StepOutputs, torch.Tensor]:
        """One backbone pass over every group; the outputs by group, and the task classifier's logits."""
        groups = self._groups()
        outs, task_logits = network(torch.cat([g.x for g in groups]), [g.prompts for g in groups],
                                    recognition=True)
        return StepOutputs(*_expand(outs, self)), task_logits

    def rec_target(self) -> torch.Tensor:
        """The task-recognition target of every image of the pass."""
        return torch.cat([g.rec_target for g in self._groups()])


def _expand(outs: list, step: StepGroups) -> list:
    """The network's outputs (one entry per present group) spread over the three group slots."""
    it = iter(outs)
    return [next(it) if g is not None else None for g in (step.labeled, step.labeled_mix, step.unlabeled_mix)]


@dataclass
class StepOutputs:
    """The network's outputs per group (each per deep-supervision scale); read them through the groups'
    accessors."""
    labeled: list[torch.Tensor]
    labeled_mix: list[torch.Tensor] | None
    unlabeled_mix: list[torch.Tensor] | None
