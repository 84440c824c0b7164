"""VerSemiTrainer variants, the nnU-Net way: class name = ``-tr`` value = results folder name, each one the default
config with named changes (``config = replace(DEFAULT, ...)``), grouped by topic. docs/METHOD.md ("Variants") lists
every one with the one thing it changes and why it exists; a test holds the table and the classes together."""

from __future__ import annotations

from dataclasses import replace

import torch

from nnunetv2_versemi.training.config import DEFAULT
from nnunetv2_versemi.training.nnunet_variants import (  # noqa: F401 (re-export)
    FOREGROUND_67,
    nnUNetTrainer_foreground67,
    nnUNetTrainer_presentClassDice,
)
from nnunetv2_versemi.training.trainer import VerSemiTrainer

# the paper's unlabeled terms alone: no L_pseudo, P_agg from the student's own heads without gradient
PAPER_TERMS = dict(pseudo_weight=0.0, pseudo_threshold=None, target_source="detach")
LABELED_ONLY = dict(unsup_weight=0.0, pseudo_weight=0.0, cons_weight=0.0)


# ---------------------------------------------------------------------------------------------- loss terms
class VerSemiTrainer_noSyn(VerSemiTrainer):
    """Without L_syn (the synthetic head then only learns from L_unsup)."""
    config = replace(DEFAULT, syn_weight=0.0)


class VerSemiTrainer_noSpec(VerSemiTrainer):
    """Without L_spec, the task-specific loss on the labeled mix."""
    config = replace(DEFAULT, spec_weight=0.0)


class VerSemiTrainer_noSupFinish(VerSemiTrainer):
    """Without the closing phase: the CutMix terms to the last epoch, as the paper trains (the default before the
    closing phase; the benchmarks' earlier (d))."""
    config = replace(DEFAULT, sup_finish_fraction=0.0)


class VerSemiTrainer_supFinish(VerSemiTrainer):
    """A closing phase half as long as the default's: the last 20 % of the epochs L_sup alone."""
    config = replace(DEFAULT, sup_finish_fraction=0.2)


class VerSemiTrainer_supFinish40(VerSemiTrainer):
    """The default (the last 40 % of the epochs L_sup alone) under the name the benchmark commands of
    docs/results use."""
    config = replace(DEFAULT, sup_finish_fraction=0.4)


class VerSemiTrainer_noUnsup(VerSemiTrainer):
    """Labeled-only VerSemi: prompts, synthetic task and L_spec, no unlabeled images."""
    config = replace(DEFAULT, **LABELED_ONLY)


class VerSemiTrainer_supOnly(VerSemiTrainer):
    """Only L_sup: each labeled case under its own prompt; the prompted multi-task baseline the VerSemi terms are
    measured against."""
    config = replace(DEFAULT, **LABELED_ONLY, syn_weight=0.0, spec_weight=0.0)


class VerSemiTrainer_paperTerms(VerSemiTrainer):
    """The paper's loss terms only: no L_pseudo, and P_agg is the student's own prediction without gradient (no
    EMA teacher). The default before L_pseudo (the benchmarks' earlier (d))."""
    config = replace(DEFAULT, **PAPER_TERMS)


class VerSemiTrainer_unsupOnly(VerSemiTrainer):
    """Without L_pseudo: the unlabeled images train only through the paper's L_unsup (the EMA teacher's P_agg as its
    target); with ``_pseudoOnly`` it attributes the default's unlabeled gain to its two terms."""
    config = replace(DEFAULT, pseudo_weight=0.0)


class VerSemiTrainer_pseudoOnly(VerSemiTrainer):
    """Without the paper's L_unsup: the unlabeled images train only the task heads, through L_pseudo."""
    config = replace(DEFAULT, unsup_weight=0.0)


class VerSemiTrainer_unsupOnly_noSupFinish(VerSemiTrainer):
    """``_unsupOnly`` without the closing phase: the ablation of the default before it (``_noSupFinish``)."""
    config = replace(DEFAULT, pseudo_weight=0.0, sup_finish_fraction=0.0)


class VerSemiTrainer_pseudoOnly_noSupFinish(VerSemiTrainer):
    """``_pseudoOnly`` without the closing phase: the ablation of the default before it (``_noSupFinish``)."""
    config = replace(DEFAULT, unsup_weight=0.0, sup_finish_fraction=0.0)


class VerSemiTrainer_pseudo(VerSemiTrainer):
    """L_pseudo in its first form: the student's own hard pseudo labels (no teacher), every voxel, Dice + CE. It made
    the heads over-segment on the demo union (docs/METHOD.md); the default uses the teacher's confident voxels."""
    config = replace(DEFAULT, pseudo_threshold=None, target_source="detach")


class VerSemiTrainer_nnunetDice(VerSemiTrainer):
    """nnU-Net's own Dice in the hard-label terms (classes absent from a batch averaged in)."""
    config = replace(DEFAULT, dice_present_classes_only=False)


class VerSemiTrainer_supOnly_nnunetDice(VerSemiTrainer):
    """L_sup only, with nnU-Net's own Dice."""
    config = replace(VerSemiTrainer_supOnly.config, dice_present_classes_only=False)


class VerSemiTrainer_foreground67(VerSemiTrainer):
    """Two of every three labeled slots forced to hold foreground (nnU-Net: one of three)."""
    config = replace(DEFAULT, foreground_oversampling=FOREGROUND_67)


class VerSemiTrainer_pseudoBalanced(VerSemiTrainer):
    """L_pseudo's cross-entropy averaged per class, then over the classes present."""
    config = replace(DEFAULT, pseudo_class_balance=True)


class VerSemiTrainer_taskBatches(VerSemiTrainer):
    """One planned nnU-Net batch per task in every step (batch x T, steps / T): each task's Dice over a batch of its
    own and the learning-rate schedule over the per-task number of steps, as per-task nnU-Net trains."""
    config = replace(DEFAULT, task_batches=True)


class VerSemiTrainer_taskBatches_nnunetDice(VerSemiTrainer):
    """Task batches with nnU-Net's own Dice: every task's hard-label loss is per-task nnU-Net's, over a batch of
    its own."""
    config = replace(DEFAULT, task_batches=True, dice_present_classes_only=False)


# ------------------------------------------------------------------------------------------ teacher, P_agg
class VerSemiTrainer_unmixedTeacher(VerSemiTrainer):
    """The default under its own name: benchmark runs of today's default stay apart from runs of earlier defaults
    stored under the name VerSemiTrainer (the commands in docs/results name it)."""
    config = DEFAULT


class VerSemiTrainer_pseudoTeacher(VerSemiTrainer):
    """P_agg from a second teacher pass, on the mix: the default as it was measured under this name (the name
    keeps those benchmark commands reproducible)."""
    config = replace(DEFAULT, teacher_input="mixed")


class VerSemiTrainer_fastTeacher(VerSemiTrainer):
    """A faster EMA teacher (``ema_alpha = 0.97``)."""
    config = replace(DEFAULT, ema_alpha=0.97)


class VerSemiTrainer_EMA(VerSemiTrainer):
    """The paper's terms with P_agg from an EMA teacher on the mix (the first teacher form measured)."""
    config = replace(DEFAULT, **PAPER_TERMS | dict(target_source="ema", teacher_input="mixed"))


class VerSemiTrainer_gradientTarget(VerSemiTrainer):
    """The paper's terms with P_agg with gradient, as in the official code: L_unsup also trains the task heads."""
    config = replace(DEFAULT, **PAPER_TERMS | dict(target_source="gradient"))


class VerSemiTrainer_sourceAgg(VerSemiTrainer):
    """The paper's terms with P_agg from each region's own source task head instead of the max over every head."""
    config = replace(DEFAULT, **PAPER_TERMS, unsup_aggregate="source")


# --------------------------------------------------------------------------------------- mixes, schedule
class VerSemiTrainer_officialMix(VerSemiTrainer):
    """Unlabeled images CutMixed with labeled ones, as in the official code; enables L_cons."""
    config = replace(DEFAULT, unlabeled_mix="labeled")


class VerSemiTrainer_ramp(VerSemiTrainer):
    """A sigmoid ramp-up of lambda over ``rampup_fraction`` of the epochs, from the same evidence-based switch as
    the two stages, with L_spec kept throughout."""
    config = replace(DEFAULT, unsup_schedule="ramp")


# ------------------------------------------------------------------------------------ head, recognition
class VerSemiTrainer_dynamicHead(VerSemiTrainer):
    """The official dynamic-only head (no static per-prompt output layer beside the dynamic convs)."""
    config = replace(DEFAULT, static_head=False)


class VerSemiTrainer_noUnsup_dynamicHead(VerSemiTrainer):
    """Labeled-only VerSemi with the official dynamic-only head."""
    config = replace(DEFAULT, **LABELED_ONLY, static_head=False)


class VerSemiTrainer_recognitionGrad(VerSemiTrainer):
    """The task recognition loss also trains the backbone (default: the classifier alone learns)."""
    config = replace(DEFAULT, recognition_detach=False)


class VerSemiTrainer_bottleneckRecognition(VerSemiTrainer):
    """The task classifier reads the pooled bottleneck features only (the first layout)."""
    config = replace(DEFAULT, recognition_input="bottleneck")


class VerSemiTrainer_recognitionAdam(VerSemiTrainer):
    """The task classifier learns with its own Adam (1e-3), outside nnU-Net's SGD and gradient clipping."""
    config = replace(DEFAULT, recognition_lr=1e-3)


# ------------------------------------------------------------------------------------------- run length
class ShortRun:
    """Mixin of the short-run trainers: ``epochs`` (and ``iterations``, ``val_iterations`` per epoch, when set)
    replace nnU-Net's budget. Put it first: ``class X(ShortRun, VerSemiTrainer): epochs = 5``."""

    epochs: int = 1000
    iterations: int | None = None
    val_iterations: int | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.epochs
        if self.iterations is not None:
            self.num_iterations_per_epoch = self.iterations
        if self.val_iterations is not None:
            self.num_val_iterations_per_epoch = self.val_iterations


class VerSemiTrainer_demo(ShortRun, VerSemiTrainer):
    """The README's quick demo (``nnUNetv2_versemi_demo --quick``): a few minutes on 2 CPU cores."""

    epochs, iterations, val_iterations = 8, 20, 5


class VerSemiTrainer_demoConverged(ShortRun, VerSemiTrainer):
    """The README demo (``nnUNetv2_versemi_demo``, plans preset ``demo``, configuration ``2d_demo``): as many
    steps as fit into a few minutes on 2 CPU cores with the demo's small network, enough for every demo task
    and the task classifier to converge (docs/BENCHMARKS.md, "The README demo")."""

    epochs, iterations, val_iterations = 36, 80, 2


# -------------------------------------------------------------------------------------- learning rate
class LearningRate:
    """Mixin of the learning-rate trainers: nnU-Net's SGD and poly schedule from ``lr`` instead of 1e-2. Put it
    first: ``class X(LearningRate, VerSemiTrainer): lr = 1e-3``."""

    lr: float = 1e-2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.lr


class VerSemiTrainer_lr3en3(LearningRate, VerSemiTrainer):
    """Fine-tuning a grown union (``nnUNetv2_versemi_add_task``) from 3e-3 instead of 1e-2 (docs/DATA.md)."""

    lr = 3e-3


class VerSemiTrainer_lr1en3(LearningRate, VerSemiTrainer):
    """Fine-tuning a grown union (``nnUNetv2_versemi_add_task``) from 1e-3 instead of 1e-2 (docs/DATA.md)."""

    lr = 1e-3


class VerSemiTrainer_addTask(ShortRun, VerSemiTrainer):
    """Fine-tuning a union grown by ``nnUNetv2_versemi_add_task`` from its warm-start weights: L_sup alone (each
    labeled case under its own prompt; ``_supOnly``'s config) for 250 epochs, 25 % of nnU-Net's 1000. Measured
    against fine-tuning with every term in docs/DATA.md ("Fine-tuning budget and learning rate")."""

    config = VerSemiTrainer_supOnly.config
    epochs = 250


# 2 epochs of 3 iterations: the test suite's trainers (run through nnUNetv2_train, which finds them here)
class VerSemiTrainer_tiny(ShortRun, VerSemiTrainer):
    epochs, iterations, val_iterations = 2, 3, 2


class VerSemiTrainer_EMA_tiny(ShortRun, VerSemiTrainer_EMA):
    epochs, iterations, val_iterations = 2, 3, 2


class VerSemiTrainer_noUnsup_tiny(ShortRun, VerSemiTrainer_noUnsup):
    epochs, iterations, val_iterations = 2, 3, 2


__all__ = [n for n, v in dict(globals()).items() if isinstance(v, type) and issubclass(v, VerSemiTrainer)]
__all__ += ["nnUNetTrainer_presentClassDice", "nnUNetTrainer_foreground67"]  # plain nnU-Net variants, found here too
