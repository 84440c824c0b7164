"""Every VerSemi hyperparameter in one frozen, validated object.

``DEFAULT`` is the method as the benchmarks measure it; each variant in :mod:`.variants` is ``DEFAULT`` with named
changes (``replace(DEFAULT, pseudo_weight=0.0)``), and :meth:`VerSemiConfig.changes` lists them back. A value the
training step cannot run with fails where the config is made, with the field's name in the message.

Paper/official code: Adam 1e-3, batch 8+8, 96^3, no augmentation, stage 1 (labeled only, r = 2/3)
then stage 2 (r ~ U(0.3, 0.6), no L_spec), consistency target with gradient on both sides.
Deviations, each a field below:
  - nnU-Net's optimizer, schedule, patch size, batch size, augmentation and deep supervision;
  - ``target_source = "ema"``: P_agg (and L_pseudo's labels) come from an EMA teacher (``ema_alpha``)
    without gradient ("detach": the student's prediction without gradient; "gradient": the official
    behaviour); ``teacher_input = "unmixed"``: one teacher pass per step, on the unmixed images, whose
    predictions CutMixed with the input's box give both ("mixed": P_agg from a second pass on the mix);
  - L_pseudo (``pseudo_weight = 1``, ``pseudo_threshold = 0.9``): lets the unlabeled images train the task
    heads directly; measured +2.1 Dice points over the paper's terms (``VerSemiTrainer_paperTerms``);
  - ``unlabeled_mix = "unlabeled"``: two unlabeled images are mixed as in the paper's formula
    ("labeled" mixes unlabeled with labeled as the official code and enables L_cons);
  - ``unsup_schedule = "stage"``: the official two stages, but stage 2 starts on evidence: after the first
    epoch in which every task's online pseudo Dice reaches ``switch_dice`` (not before
    ``stage1_min_fraction`` of the epochs), at the latest after ``stage1_fraction`` of them
    ("ramp": sigmoid ramp-up of lambda over ``rampup_fraction`` of the epochs from that same switch,
    L_spec kept); the switch epoch is logged and stored in the checkpoint;
  - ``unsup_aggregate = "source"`` (an option; default "all" as in the paper): P_agg takes each region's own
    task head; a head never trained on another dataset's images has arbitrary margins there, and the
    paper's max over every head passes its false positives on (measured in docs/METHOD.md);
  - ``unsup_min_foreground``: L_unsup skips samples whose P_agg has fewer confidently foreground voxels
    (0: no guard, the official behaviour);
  - ``static_head``: a static per-prompt output layer beside the dynamic convs;
  - ``dice_present_classes_only``: the Dice of the hard-label terms averages over the classes present in
    the target, so a small class that most batches of a union lack is not pushed to zero;
  - hard-label terms use nnU-Net's Dice+CE instead of the official Dice only;
  - one CutMix box per pair instead of one per batch; labeled pairs cross tasks whenever possible;
  - ``task_batches`` (an option): one planned nnU-Net batch per task in every step, instead of one planned batch
    shared by all tasks over T times the steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Literal, get_args, get_type_hints

LabeledBalance = Literal["tasks", "cases"]
Aggregate = Literal["source", "all"]
UnlabeledPartner = Literal["unlabeled", "labeled"]
TargetSource = Literal["ema", "detach", "gradient"]
TeacherInput = Literal["unmixed", "mixed"]
Schedule = Literal["stage", "ramp"]
RecognitionInput = Literal["stages", "bottleneck"]


@dataclass(frozen=True)
class VerSemiConfig:
    """VerSemi's hyperparameters (docs/METHOD.md explains each choice and what was measured)."""

    # -- loss weights: loss = w_sup L_sup + w_syn L_syn + w_spec L_spec + lambda (w_unsup L_unsup + w_pseudo L_pseudo
    #    + w_cons L_cons) + w_rec L_rec
    sup_weight: float = 1.0
    syn_weight: float = 1.0
    spec_weight: float = 1.0
    unsup_weight: float = 1.0
    cons_weight: float = 1.0
    # w_pseudo: CutMix self-training of each region's own task head on the EMA teacher's confident labels (not in the
    # paper; +2.1 Dice points over 3 seeds at 10 % labels, docs/BENCHMARKS.md; 0: the paper's terms)
    pseudo_weight: float = 1.0
    recognition_weight: float = 1.0
    # -- L_pseudo: None: every voxel's hard pseudo label counts (Dice + CE); a number: only voxels whose pseudo label
    #    has at least this probability count, in a cross-entropy
    pseudo_threshold: float | None = 0.9
    # -- L_pseudo's cross-entropy per class: each class's confident voxels weigh as much as another's (False: every
    #    confident voxel alike, where background outnumbers a small structure by orders of magnitude)
    pseudo_class_balance: bool = False
    # -- the hard-label terms' Dice over the classes present in the target (False: nnU-Net's Dice, which lets a small
    #    class of one task collapse to zero in a union; docs/METHOD.md)
    dice_present_classes_only: bool = True
    # -- mixes: box side ratios of the labeled CutMix (stage 1) and of the unlabeled one (and stage 2's labeled)
    labeled_box_ratio: tuple[float, float] = (2 / 3, 2 / 3)
    unlabeled_box_ratio: tuple[float, float] = (0.3, 0.6)
    unlabeled_mix: UnlabeledPartner = "unlabeled"  # an unlabeled image's CutMix partner ("labeled": enables L_cons)
    labeled_balance: LabeledBalance = "tasks"  # "cases": tasks drawn in proportion to their labeled case counts
    # True: each step holds one planned batch per task (batch size x T, iterations per epoch / T, rounded up; the
    # same number of patches): every task's Dice is nnU-Net's batch Dice over a batch of its own, each task's group
    # gets nnU-Net's number of foreground-forced slots, the learning-rate schedule spans the per-task number of
    # steps, and a step's loss counts T times, so each task's L_sup is its per-task loss at full weight (only with
    # labeled_balance "tasks")
    task_batches: bool = False
    unlabeled_batch_size: int | None = None  # None: the labeled batch size
    # share of each labeled batch's slots forced to hold foreground (None: nnU-Net's oversample_foreground_percent,
    # 0.33); a larger share shows a small structure, present in few slices of its task, more often
    foreground_oversampling: float | None = None
    # -- the consistency target P_agg and the pseudo labels
    unsup_aggregate: Aggregate = "all"  # max over every task head (paper); "source": each region's own head
    target_source: TargetSource = "ema"  # EMA teacher; "detach": the student without gradient; "gradient": official
    # with the EMA teacher: "unmixed": one pass on the unmixed images, whose predictions CutMixed with the input's box
    # give P_agg and the pseudo labels; "mixed": a second pass, on the mix, for P_agg
    teacher_input: TeacherInput = "unmixed"
    ema_alpha: float = 0.99
    unsup_min_foreground: float = 1e-3  # guard: fraction of voxels with P_agg > 0.5 a sample needs
    empty_warning_epochs: int = 3  # warn when P_agg stays empty for this many stage-2 epochs
    # -- stage schedule: stage 2 starts once every task's online pseudo Dice reaches switch_dice, not before
    #    stage1_min_fraction of the epochs, at the latest after stage1_fraction ("ramp": lambda ramps up from there)
    unsup_schedule: Schedule = "stage"
    stage1_fraction: float = 0.5
    stage1_min_fraction: float = 0.1
    switch_dice: float = 0.5
    rampup_fraction: float = 0.2
    # the last this fraction of the epochs (rounded down) train L_sup (and L_rec) alone, on the unmixed labeled
    # images: every CutMix term off (0: none, the paper's schedule; docs/BENCHMARKS.md, "The closing phase")
    sup_finish_fraction: float = 0.4
    allow_labeled_only: bool = False  # True: train without unlabeled images (logged), instead of failing
    # -- task recognition (prompt-free prediction)
    # None: the task classifier learns with nnU-Net's SGD; a number: its own Adam with this learning rate, outside
    # nnU-Net's gradient clipping (only with recognition_detach)
    recognition_lr: float | None = None
    recognition_detach: bool = True  # False: L_rec reaches the backbone too (measured, not needed)
    recognition_threshold: float = 0.5  # final validation warns for a case recognised below this probability
    validate_prompted_too: bool = True  # final validation also under each case's own prompt (an extra entry)
    # -- structure (nnU-Net's predictors rebuild the network from the trainer class alone)
    static_head: bool = True  # a static per-prompt output layer beside the dynamic convs
    recognition_input: RecognitionInput = "stages"  # the task classifier reads every encoder stage, or the bottleneck

    def __post_init__(self):
        hints = get_type_hints(VerSemiConfig)
        for f in fields(self):
            choices = get_args(hints[f.name]) if getattr(hints[f.name], "__origin__", None) is Literal else ()
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be {' or '.join(repr(c) for c in choices)}, "
                                 f"got {getattr(self, f.name)!r}")
        for name in ("sup_weight", "syn_weight", "spec_weight", "unsup_weight", "cons_weight", "pseudo_weight",
                     "recognition_weight"):
            _number(self, name, lambda v: v >= 0, "a number >= 0")
        if self.recognition_lr is not None:
            _number(self, "recognition_lr", lambda v: v > 0, "None or a number > 0")
        if self.pseudo_threshold is not None:
            _number(self, "pseudo_threshold", lambda v: 0 < v < 1, "None or a number in (0, 1)")
        _number(self, "ema_alpha", lambda v: 0 <= v < 1, "a number in [0, 1)")
        if self.foreground_oversampling is not None:
            _number(self, "foreground_oversampling", lambda v: 0 <= v <= 1, "None or a number in [0, 1]")
        for name in ("stage1_fraction", "stage1_min_fraction", "switch_dice", "unsup_min_foreground",
                     "rampup_fraction", "recognition_threshold"):
            _number(self, name, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _number(self, "sup_finish_fraction", lambda v: 0 <= v < 1, "a number in [0, 1)")
        if self.stage1_min_fraction > self.stage1_fraction:
            raise ValueError(f"stage1_min_fraction ({self.stage1_min_fraction}) must not exceed stage1_fraction "
                             f"({self.stage1_fraction})")
        if (self.unsup_weight > 0 or self.pseudo_weight > 0 or self.cons_weight > 0) and \
                self.stage1_min_fraction + self.sup_finish_fraction >= 1:
            raise ValueError(f"sup_finish_fraction ({self.sup_finish_fraction}) and stage1_min_fraction "
                             f"({self.stage1_min_fraction}) leave no epoch for the unlabeled terms: their sum must "
                             "be below 1")
        for name in ("empty_warning_epochs", "unlabeled_batch_size"):
            v = getattr(self, name)
            if (v is not None or name == "empty_warning_epochs") and (
                    not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer{' or None' * (name != 'empty_warning_epochs')}"
                                 f", got {v!r}")
        for name in ("labeled_box_ratio", "unlabeled_box_ratio"):
            v = getattr(self, name)
            if not (isinstance(v, tuple) and len(v) == 2 and all(_is_number(r) and 0 < r <= 1 for r in v)
                    and v[0] <= v[1]):
                raise ValueError(f"{name} must be a (low, high) pair in (0, 1] with low <= high, got {v!r}")
        if self.task_batches and self.labeled_balance != "tasks":
            raise ValueError("task_batches needs labeled_balance 'tasks': a batch per task is a task-balanced batch")
        for name in ("dice_present_classes_only", "pseudo_class_balance", "task_batches", "allow_labeled_only",
                     "recognition_detach", "validate_prompted_too", "static_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def uses_unlabeled(self) -> bool:
        """Whether any loss term reads unlabeled images."""
        return self.unsup_weight > 0 or self.pseudo_weight > 0 or (
            self.cons_weight > 0 and self.unlabeled_mix == "labeled")

    def changes(self, base: VerSemiConfig | None = None) -> dict:
        """The fields that differ from ``base`` (default: ``DEFAULT``), with this config's values."""
        base = DEFAULT if base is None else base
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(base, f.name)}

    def to_dict(self) -> dict:
        """Every field, JSON-ready (tuples as lists): what the training log and the checkpoint record."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> VerSemiConfig:
        """The inverse of :meth:`to_dict`. A field a checkpoint lacks (an older version) takes the value that version
        trained with: ``BEFORE_FIELD`` where the field's default has since changed, its default otherwise."""
        known = {f.name for f in fields(cls)}
        values = {**BEFORE_FIELD, **values}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


# what a version without the field trained with, where that differs from the field's default today
BEFORE_FIELD = {"sup_finish_fraction": 0.0}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(config: VerSemiConfig, name: str, ok, what: str) -> None:
    v = getattr(config, name)
    if not _is_number(v) or not ok(v):
        raise ValueError(f"{name} must be {what}, got {v!r}")


DEFAULT = VerSemiConfig()
