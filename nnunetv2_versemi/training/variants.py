"""VerSemiTrainer ablations and short runs. Class name = ``-tr`` value = results folder name."""

from __future__ import annotations

import torch

from nnunetv2_versemi.training.nnunet_variants import nnUNetTrainer_presentClassDice  # noqa: F401 (re-export)
from nnunetv2_versemi.training.trainer import VerSemiTrainer


class VerSemiTrainer_noSyn(VerSemiTrainer):
    """Without the synthetic-task CutMix loss (the synthetic head then only learns from L_unsup)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.syn_weight = 0.0


class VerSemiTrainer_noSpec(VerSemiTrainer):
    """Without the task-specific loss on the labeled mix."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.spec_weight = 0.0


class VerSemiTrainer_noUnsup(VerSemiTrainer):
    """Labeled-only VerSemi: prompts, synthetic task and L_spec, no unlabeled images."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_weight = 0.0
        self.pseudo_weight = 0.0
        self.cons_weight = 0.0


class VerSemiTrainer_paperTerms(VerSemiTrainer):
    """The paper's loss terms only: no L_pseudo, and the consistency target P_agg is the student's own
    prediction without gradient (no EMA teacher). The default before L_pseudo with an EMA teacher (the
    benchmarks' earlier (d))."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pseudo_weight = 0.0
        self.pseudo_threshold = None
        self.target_source = "detach"


class VerSemiTrainer_unsupOnly(VerSemiTrainer):
    """The default without L_pseudo: the unlabeled images train only through the paper's L_unsup (the EMA
    teacher's P_agg as its target); with ``_pseudoOnly`` it attributes the default's unlabeled gain to its
    two terms."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pseudo_weight = 0.0


class VerSemiTrainer_pseudoOnly(VerSemiTrainer):
    """The default without the paper's L_unsup: the unlabeled images train only the task heads, through
    L_pseudo on the EMA teacher's confident labels (the stage switch as in the default)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_weight = 0.0


class VerSemiTrainer_supOnly(VerSemiTrainer_noUnsup):
    """Only L_sup: each labeled case under its own prompt (no synthetic task, no L_spec, no unlabeled images);
    the prompted multi-task baseline the VerSemi terms are measured against."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.syn_weight = 0.0
        self.spec_weight = 0.0


class VerSemiTrainer_pseudo(VerSemiTrainer_paperTerms):
    """L_pseudo in its first form, on the paper's terms: each region of an unlabeled mix also trains its own
    task's head on the student's own hard pseudo labels from the unmixed images, every voxel, Dice + CE. On
    the demo union it made the heads over-segment (docs/METHOD.md); the default uses an EMA teacher and only
    its confident voxels."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pseudo_weight = 1.0


class VerSemiTrainer_unmixedTeacher(VerSemiTrainer):
    """VerSemiTrainer's defaults, spelled out: L_pseudo from an EMA teacher's labels on the unmixed images, on
    the voxels whose pseudo label has probability >= 0.9 only, in a cross-entropy (the guarded form of
    ``VerSemiTrainer_pseudo``, docs/METHOD.md); the same one teacher pass per step gives P_agg, as the CutMix
    of its predictions. Its own name keeps benchmark runs of these defaults apart from the runs of earlier
    defaults under the name VerSemiTrainer."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pseudo_weight = 1.0
        self.pseudo_threshold = 0.9
        self.target_source = "ema"
        self.teacher_input = "unmixed"


class VerSemiTrainer_pseudoTeacher(VerSemiTrainer_unmixedTeacher):
    """``VerSemiTrainer_unmixedTeacher`` with P_agg from a second teacher pass, on the mix
    (``teacher_input = "mixed"``): the defaults as they were measured under this name (the name keeps those
    benchmark commands reproducible)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher_input = "mixed"


class VerSemiTrainer_fastTeacher(VerSemiTrainer_unmixedTeacher):
    """``VerSemiTrainer_unmixedTeacher`` with a faster EMA teacher, ``ema_alpha = 0.97``: about the pace the
    encoder half of the teacher had while the EMA update ran once per state-dict key (docs/METHOD.md)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ema_alpha = 0.97


class VerSemiTrainer_sourceAgg(VerSemiTrainer_paperTerms):
    """P_agg from each region's own source task head instead of the max over every task head (see
    ``unsup_aggregate``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_aggregate = "source"


class VerSemiTrainer_nnunetDice(VerSemiTrainer):
    """VerSemi with nnU-Net's own Dice in the hard-label terms (classes absent from a batch averaged in)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.dice_present_classes_only = False


class VerSemiTrainer_supOnly_nnunetDice(VerSemiTrainer_supOnly):
    """L_sup only, with nnU-Net's own Dice."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.dice_present_classes_only = False


class VerSemiTrainer_EMA(VerSemiTrainer_paperTerms):
    """Consistency target from an EMA teacher (alpha ``ema_alpha``) instead of the detached student."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.target_source = "ema"
        self.teacher_input = "mixed"  # as measured: the teacher predicts the mix


class VerSemiTrainer_gradientTarget(VerSemiTrainer_paperTerms):
    """Consistency target with gradient, as in the official code: L_unsup also trains the task heads (through
    P_agg) toward the synthetic head's prediction, so unlabeled images reach them directly."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.target_source = "gradient"


class VerSemiTrainer_officialMix(VerSemiTrainer):
    """Unlabeled images CutMixed with labeled ones, as in the official code; enables L_cons."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unlabeled_mix = "labeled"


class VerSemiTrainer_ramp(VerSemiTrainer):
    """Sigmoid ramp-up of the unlabeled weight over the first 20% of epochs, L_spec kept throughout,
    instead of the two stages."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_schedule = "ramp"


class VerSemiTrainer_dynamicHead(VerSemiTrainer):
    """The official dynamic-only head (no static per-prompt output layer beside the dynamic convs)."""

    static_head = False


class VerSemiTrainer_noUnsup_dynamicHead(VerSemiTrainer_noUnsup):
    """Labeled-only VerSemi with the official dynamic-only head."""

    static_head = False


class VerSemiTrainer_recognitionGrad(VerSemiTrainer):
    """The task recognition loss also trains the backbone (default: the classifier alone learns from the
    features, which the segmentation losses shape)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.recognition_detach = False


class VerSemiTrainer_bottleneckRecognition(VerSemiTrainer):
    """The task classifier reads the pooled bottleneck features only (the first layout), not every encoder
    stage."""

    recognition_input = "bottleneck"


class VerSemiTrainer_recognitionAdam(VerSemiTrainer):
    """The task classifier learns with its own Adam (learning rate 1e-3), outside nnU-Net's SGD and its
    gradient clipping over the whole network."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.recognition_lr = 1e-3


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


# short runs for demos, tests and benchmarks
class VerSemiTrainer_1epoch(ShortRun, VerSemiTrainer):
    epochs = 1


class VerSemiTrainer_5epochs(ShortRun, VerSemiTrainer):
    epochs = 5


class VerSemiTrainer_20epochs(ShortRun, VerSemiTrainer):
    epochs = 20


class VerSemiTrainer_50epochs(ShortRun, VerSemiTrainer):
    epochs = 50


class VerSemiTrainer_100epochs(ShortRun, VerSemiTrainer):
    epochs = 100


class VerSemiTrainer_noUnsup_5epochs(ShortRun, VerSemiTrainer_noUnsup):
    epochs = 5


class VerSemiTrainer_noUnsup_20epochs(ShortRun, VerSemiTrainer_noUnsup):
    epochs = 20


class VerSemiTrainer_noUnsup_50epochs(ShortRun, VerSemiTrainer_noUnsup):
    epochs = 50


class VerSemiTrainer_demo(ShortRun, VerSemiTrainer):
    """The README demo: a few minutes on 2 CPU cores."""

    epochs, iterations, val_iterations = 8, 20, 5


class VerSemiTrainer_demoConverged(ShortRun, VerSemiTrainer):
    """The README demo (``nnUNetv2_versemi_demo``, plans preset ``demo``, configuration ``2d_demo``): as many
    steps as fit into a few minutes on 2 CPU cores with the demo's small network, enough for every demo task
    and the task classifier to converge (docs/BENCHMARKS.md, "The README demo")."""

    epochs, iterations, val_iterations = 12, 80, 2


class VerSemiTrainer_tiny(ShortRun, VerSemiTrainer):
    """2 epochs of 3 iterations, for tests and the quick demo."""

    epochs, iterations, val_iterations = 2, 3, 2


class VerSemiTrainer_EMA_tiny(ShortRun, VerSemiTrainer_EMA):
    epochs, iterations, val_iterations = 2, 3, 2


class VerSemiTrainer_officialMix_tiny(ShortRun, VerSemiTrainer_officialMix):
    epochs, iterations, val_iterations = 2, 3, 2


class VerSemiTrainer_noUnsup_tiny(ShortRun, VerSemiTrainer_noUnsup):
    epochs, iterations, val_iterations = 2, 3, 2


__all__ = [n for n, v in dict(globals()).items() if isinstance(v, type) and issubclass(v, VerSemiTrainer)]
__all__.append("nnUNetTrainer_presentClassDice")  # the plain nnU-Net variant, found through the same module
