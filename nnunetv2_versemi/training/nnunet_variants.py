"""Plain nnU-Net trainers (one dataset, no prompts) with one of VerSemi's changes, for single-task users and
for attributing VerSemi's gains: class name = ``-tr`` value = results folder name."""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from typing_extensions import override

from nnunetv2_versemi.training import losses

#: the forced-foreground share of both foreground67 trainers (nnU-Net's: 0.33)
FOREGROUND_67 = 0.67


class nnUNetTrainer_presentClassDice(nnUNetTrainer):
    """nnUNetTrainer whose Dice averages over the classes present in the target
    (:class:`~nnunetv2_versemi.training.losses.PresentClassDiceLoss`); everything else is nnU-Net's.

    With batch Dice and few labeled cases, a small class absent from a batch costs its full Dice for any
    prediction of it, which can hold it at 0 for good; here absent classes only get the cross-entropy term.
    Region-based label sets keep nnU-Net's loss."""

    @override
    def _build_loss(self):
        if self.label_manager.has_regions:
            return super()._build_loss()
        return losses.dice_ce(
            self.configuration_manager.batch_dice, self.label_manager.ignore_label, self.is_ddp,
            len(self._get_deep_supervision_scales()) if self.enable_deep_supervision else None)


class nnUNetTrainer_foreground67(nnUNetTrainer):
    """nnUNetTrainer with two of every three batch slots forced to hold foreground (nnU-Net: one of three), as
    ``VerSemiTrainer_foreground67`` samples its labeled batches: per-task nnU-Net with the same sampling, so that a
    comparison tells the sampling's gain from the union's."""

    # nnU-Net records the __init__ arguments by name (my_init_kwargs): the signature must be nnUNetTrainer's
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.oversample_foreground_percent = FOREGROUND_67
