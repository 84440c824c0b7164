"""VerSemi's loss terms, each by its name in the paper, from the named input groups and outputs of one step.

  L_sup    Dice+CE of each labeled case under its own task prompt (nnU-Net's loss, deep supervision)
  L_syn    Dice+CE of the synthetic prompt on the labeled mix vs the union foreground of both parts
  L_spec   Dice+CE of a's / b's prompt on the labeled mix vs a's foreground outside / b's inside the box
  L_unsup  squared soft Dice of the synthetic prompt on the unlabeled mix vs P_agg (every task head's foreground,
           aggregated), on the samples whose P_agg holds foreground
  L_pseudo cross-entropy of each region's own task head on the unlabeled mix vs the teacher's confident labels
  L_cons   soft Dice of the synthetic prompt vs the known foreground of a labeled partner inside the box
  L_rec    cross-entropy of the task classifier on every image of the pass
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from nnunetv2_versemi.training import losses
from nnunetv2_versemi.training.config import VerSemiConfig
from nnunetv2_versemi.training.mixes import LabeledBatch, LabeledMix, StepGroups, StepOutputs, UnlabeledMix

LOSS_TERMS = ("sup", "syn", "spec", "unsup", "pseudo", "cons", "rec")

HardLoss = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]


class LossTerms:
    """Every term the step's groups allow; ``hard_loss`` is nnU-Net's Dice + CE over the deep-supervision scales,
    ``num_classes`` the classes per prompt (the synthetic task's last)."""

    def __init__(self, config: VerSemiConfig, num_classes: list[int], hard_loss: HardLoss,
                 ds_weights: list[float]):
        self.config, self.num_classes, self.hard_loss, self.ds_weights = config, num_classes, hard_loss, ds_weights
        self.num_tasks = len(num_classes) - 1

    def __call__(self, step: StepGroups, out: StepOutputs, task_logits: torch.Tensor, stage_two: bool
                 ) -> tuple[dict[str, torch.Tensor], dict]:
        """The terms (unweighted) and the unlabeled statistics for the log."""
        terms = {"rec": losses.soft_cross_entropy(task_logits, step.rec_target()),
                 "sup": self.supervised(out.labeled, step.labeled)}
        if step.labeled_mix is not None:
            terms["syn"] = self.hard_loss(LabeledMix.synthetic(out.labeled_mix), step.labeled_mix.syn)
            if not stage_two:
                terms["spec"] = self.specific(out.labeled_mix, step.labeled_mix)
        stats = {}
        if step.unlabeled_mix is not None:
            un, out_u = step.unlabeled_mix, out.unlabeled_mix
            p_syn = [losses.foreground_probability(o, 2) for o in UnlabeledMix.synthetic(out_u)]
            terms["unsup"], stats = self.unsupervised(out_u, p_syn, un)
            if un.partner_idx is not None:
                terms["cons"] = self.consistency_with_labels(p_syn, un, step.labeled)
            if un.pseudo is not None:
                terms["pseudo"] = self.pseudo(out_u, un)
        return terms, stats

    def weights(self, lam: float) -> dict[str, float]:
        c = self.config
        return dict(sup=c.sup_weight, syn=c.syn_weight, spec=c.spec_weight, unsup=c.unsup_weight * lam,
                    pseudo=c.pseudo_weight * lam, cons=c.cons_weight * lam, rec=c.recognition_weight)

    def supervised(self, outs: list[torch.Tensor], batch: LabeledBatch) -> torch.Tensor:
        """L_sup."""
        return losses.prompted_supervised_loss(LabeledBatch.own_prompt(outs), batch.local, batch.tasks,
                                               self.num_classes, self.hard_loss)

    def specific(self, outs: list[torch.Tensor], mix: LabeledMix) -> torch.Tensor:
        """L_spec: the mean of a's and b's side."""
        return 0.5 * (
            losses.prompted_supervised_loss(LabeledMix.outside_task(outs), mix.spec_a, mix.tasks_a, self.num_classes,
                                            self.hard_loss)
            + losses.prompted_supervised_loss(LabeledMix.inside_task(outs), mix.spec_b, mix.tasks_b, self.num_classes,
                                              self.hard_loss))

    def p_agg(self, outs: list[torch.Tensor], un: UnlabeledMix) -> list[torch.Tensor]:
        """P_agg per scale: every task's foreground on the mix (the EMA teacher's, or the student's own heads':
        ``target_source``), aggregated: the max over every task head ("all", the paper), or each region's own
        source task head ("source")."""
        if un.task_fg is not None:
            task_fg = un.task_fg
        else:
            heads = un.every_task(outs, self.num_tasks)
            task_fg = [losses.task_foreground(o if self.config.target_source == "gradient" else o.detach(),
                                              self.num_classes[:-1]) for o in heads]
        if self.config.unsup_aggregate == "source":
            return [losses.source_task_foreground(f, un.tasks, un.partner_tasks, un.box(f.shape[2:]))
                    for f in task_fg], task_fg
        return [f.max(dim=1).values for f in task_fg], task_fg

    def unsupervised(self, outs: list[torch.Tensor], p_syn: list[torch.Tensor], un: UnlabeledMix
                     ) -> tuple[torch.Tensor, dict]:
        """L_unsup (``p_syn``: the synthetic prompt's foreground probability per scale), plus the share of samples the guard kept and, per task, the share of voxels its head calls
        foreground on the mixes. The guard is decided once, at full resolution, for every scale."""
        agg, task_fg = self.p_agg(outs, un)
        keep = losses.foreground_guard(agg[0], self.config.unsup_min_foreground)
        term = losses.deep_supervision_sum(
            [losses.guarded_consistency_loss(p, q, keep) for p, q in zip(p_syn, agg)], self.ds_weights)
        with torch.no_grad():
            stats = {"unsup_kept": keep.float().mean().item(),
                     "task_fg": (task_fg[0] > 0.5).flatten(2).float().mean(dim=(0, 2)).cpu().numpy()}
        return term, stats

    def consistency_with_labels(self, p_syn: list[torch.Tensor], un: UnlabeledMix, batch: LabeledBatch
                                ) -> torch.Tensor:
        """L_cons: the box holds a labeled partner, whose known foreground supervises the synthetic prompt there."""
        cons = []
        for p, f in zip(p_syn, batch.fg):
            cons.append(losses.soft_dice_loss(p, f[un.partner_idx][:, 0], mask=un.box(p.shape[1:])[:, 0]))
        return losses.deep_supervision_sum(cons, self.ds_weights)

    def pseudo(self, outs: list[torch.Tensor], un: UnlabeledMix) -> torch.Tensor:
        """L_pseudo: under the outside image's task and under the inside image's task, the head's output on the
        mix vs the CutMix of that head's pseudo labels on the unmixed images (nnU-Net's Dice + CE; with
        ``pseudo_threshold``, a cross-entropy over the confident voxels); the mean of both sides."""
        loss = self.hard_loss if self.config.pseudo_threshold is None else self._confident_ce
        sides = [losses.prompted_supervised_loss(un.region_task(outs, inside), targets, tasks, self.num_classes,
                                                 loss)
                 for inside, tasks, targets in ((False, un.tasks, un.pseudo[0]),
                                                (True, un.partner_tasks, un.pseudo[1]))]
        return 0.5 * (sides[0] + sides[1])

    def _confident_ce(self, logits: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """Cross-entropy per scale over the voxels with a pseudo label (target >= 0); a scale without any counts 0."""
        return losses.deep_supervision_sum(
            [losses.masked_cross_entropy(lg, tg[:, 0], self.config.pseudo_class_balance)
             for lg, tg in zip(logits, targets)], self.ds_weights)


def step_record(loss: torch.Tensor, terms: dict[str, torch.Tensor], stats: dict, lam: float, num_tasks: int
                ) -> dict:
    """What ``train_step`` returns for nnU-Net's epoch log: the loss, every term (NaN when it did not run), lambda
    and the unlabeled statistics."""
    out = {"loss": loss.detach().cpu().numpy(), "unsup_lambda": np.array(lam),
           "unsup_kept": np.array(stats.get("unsup_kept", np.nan)),
           "task_fg": stats.get("task_fg", np.full(num_tasks, np.nan))}
    for k in LOSS_TERMS:
        out[k] = terms[k].detach().cpu().numpy() if k in terms else np.array(np.nan)
    return out
