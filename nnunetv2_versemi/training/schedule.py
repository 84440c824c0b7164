"""When the unlabeled terms start, and their weight lambda per epoch.

Stage 1 trains on labeled images only (L_sup, L_syn, L_spec, labeled CutMix boxes of ``labeled_box_ratio``). Stage 2
adds the unlabeled terms, drops L_spec and draws the labeled boxes like the unlabeled ones (the official two
stages). Stage 2 starts on evidence: after the first epoch in which every task's online pseudo Dice reaches
``switch_dice``, not before ``stage1_min_fraction`` of the epochs, at the latest after ``stage1_fraction`` of them.
With ``unsup_schedule = "ramp"`` lambda ramps up from that same switch instead, and L_spec stays. With
``sup_finish_fraction`` the last epochs train L_sup alone (every CutMix term off).
"""

from __future__ import annotations

import numpy as np

from nnunetv2_versemi.training.config import VerSemiConfig


def sigmoid_rampup(progress: float) -> float:
    """exp(-5 (1 - t)^2) for t in [0, 1] (Laine & Aila), 1 afterwards."""
    t = float(np.clip(progress, 0.0, 1.0))
    return float(np.exp(-5.0 * (1.0 - t) ** 2))


class StageSchedule:
    """The switch epoch (None: still in stage 1; stored in the checkpoint) and what follows from it."""

    def __init__(self, config: VerSemiConfig, active: bool):
        self.config = config
        self.active = active  # False: no unlabeled term, stage 1 throughout
        self.switch_epoch: int | None = None

    def unlabeled_weight(self, epoch: int, num_epochs: int) -> float:
        """lambda(epoch): 0 before the switch, then 1 ("stage") or a sigmoid ramp from the switch epoch over
        ``rampup_fraction`` of the epochs ("ramp")."""
        if not self.active or self.switch_epoch is None or epoch < self.switch_epoch:
            return 0.0
        if self.config.unsup_schedule == "stage" or self.config.rampup_fraction <= 0:
            return 1.0
        return sigmoid_rampup((epoch - self.switch_epoch) / (self.config.rampup_fraction * max(1, num_epochs)))

    def in_stage_two(self, epoch: int) -> bool:
        """Whether L_spec is dropped and the labeled boxes are drawn like the unlabeled ones."""
        return self.config.unsup_schedule == "stage" and self.switch_epoch is not None and epoch >= self.switch_epoch

    def sup_finish_epochs(self, num_epochs: int) -> int:
        """How many of the last epochs form the closing phase: ``sup_finish_fraction`` of them, rounded down (a run
        too short for one whole closing epoch has none)."""
        return int(self.config.sup_finish_fraction * num_epochs + 1e-9)

    def in_sup_finish(self, epoch: int, num_epochs: int) -> bool:
        """Whether ``epoch`` is in the closing phase of ``sup_finish_fraction``: L_sup alone, no CutMix term."""
        return epoch >= num_epochs - self.sup_finish_epochs(num_epochs)

    def labeled_box_ratio(self, epoch: int) -> tuple[float, float]:
        return self.config.unlabeled_box_ratio if self.in_stage_two(epoch) else self.config.labeled_box_ratio

    def below_switch(self, pseudo_dice: dict[str, float]) -> list[str]:
        """The tasks whose pseudo Dice has not reached ``switch_dice`` (NaN never counts as reached)."""
        return [k for k, v in pseudo_dice.items() if not v >= self.config.switch_dice]

    def due(self, epoch: int, num_epochs: int, pseudo_dice: dict[str, float]) -> str | None:
        """After epoch ``epoch``'s validation: why the unlabeled terms start with the next epoch, or None.

        Evidence first (so P_agg is not empty); at ``stage1_fraction`` the switch comes regardless (the L_unsup
        guard then skips empty targets) and the reason names the tasks still below the threshold. A task without
        a pseudo Dice (NaN: none of its classes in the epoch's validation patches) never counts as good."""
        c = self.config
        nxt = epoch + 1
        if not self.active or self.switch_epoch is not None or nxt >= num_epochs:
            return None
        below = self.below_switch(pseudo_dice)
        if nxt < c.stage1_min_fraction * num_epochs or (below and nxt < c.stage1_fraction * num_epochs):
            return None
        return (f"every task's pseudo Dice >= {c.switch_dice}" if not below else
                f"epoch limit stage1_fraction={c.stage1_fraction} reached; below {c.switch_dice}: {', '.join(below)}")
