"""The VerSemi entries of nnU-Net's epoch log: every loss term, lambda and the guard's share per epoch, and the
task recognition accuracy per task. Written through nnU-Net's logger API (``log``, ``get_checkpoint``,
``load_checkpoint``), and so stored in nnU-Net's checkpoint with the rest of the log."""

from __future__ import annotations

from nnunetv2_versemi.training.terms import LOSS_TERMS

STAT_KEYS = ("unsup_lambda", "unsup_kept")  # logged per epoch beside the loss terms
STEP_KEYS = (*LOSS_TERMS, *STAT_KEYS)  # averaged over an epoch's training steps
REC_KEY = "recognition"  # per epoch: task recognition accuracy per task on the validation batches


def add_keys(logger, num_tasks: int, epochs: int) -> None:
    """Give nnU-Net's logger (its ``MetaLogger``) every VerSemi key, padded with NaN to ``epochs`` entries:
    nnU-Net's logger only logs keys it has, one value per epoch (a checkpoint of an earlier version may lack
    some)."""
    log = logger.get_checkpoint()
    for key in STEP_KEYS:
        vals = log.setdefault(f"versemi_{key}", [])
        vals.extend([float("nan")] * (epochs - len(vals)))
    vals = log.setdefault(f"versemi_{REC_KEY}", [])
    vals.extend([[float("nan")] * num_tasks] * (epochs - len(vals)))
    logger.load_checkpoint(log)
