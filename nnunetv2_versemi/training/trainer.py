"""VerSemiTrainer: nnU-Net training with task prompts, the CutMix synthetic task and unlabeled consistency."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from os.path import isdir, isfile, join

import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast
from torch import distributed as dist
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP
from typing_extensions import override

from nnunetv2_versemi.data.preprocess import missing_unlabeled, unlabeled_folder
from nnunetv2_versemi.data.splits import complete_validation
from nnunetv2_versemi.network.head import VerSemiNetwork
from nnunetv2_versemi.tasktable import TaskTable, TaskTableError
from nnunetv2_versemi.training import cutmix, losses
from nnunetv2_versemi.training.sampling import TaskBalancedDataLoader

LOSS_TERMS = ("sup", "syn", "spec", "unsup", "pseudo", "cons", "rec")
STAT_KEYS = ("unsup_lambda", "unsup_kept")  # logged per epoch beside the loss terms
REC_KEY = "recognition"  # per epoch: task recognition accuracy per task on the validation batches


def split_global_batch(global_batch: int, world_size: int, rank: int) -> int:
    """This rank's share of a global batch, distributed the way nnU-Net distributes its labeled batch."""
    if global_batch < world_size:
        raise ValueError(f"Batch size {global_batch} is smaller than the number of GPUs ({world_size})")
    return global_batch // world_size + (1 if rank < global_batch % world_size else 0)


def sigmoid_rampup(progress: float) -> float:
    """exp(-5 (1 - t)^2) for t in [0, 1] (Laine & Aila), 1 afterwards."""
    t = float(np.clip(progress, 0.0, 1.0))
    return float(np.exp(-5.0 * (1.0 - t) ** 2))


@dataclass
class _LabeledMix:
    """Targets of the labeled CutMix, per deep-supervision scale: L_syn's and L_spec's (a side, b side)."""
    half: int
    syn: list[torch.Tensor]
    spec_a: list[torch.Tensor]
    spec_b: list[torch.Tensor]


@dataclass
class _UnlabeledMix:
    """The unlabeled CutMix: input, box mask, tasks outside / inside the box, labeled partners (official
    mixing), the pseudo labels of L_pseudo and (with the EMA teacher) every task's foreground on the mix."""
    x: torch.Tensor
    mask: torch.Tensor
    tasks: torch.Tensor
    partner_tasks: torch.Tensor
    partner_idx: torch.Tensor | None
    pseudo: tuple[list[torch.Tensor], list[torch.Tensor]] | None
    task_fg: list[torch.Tensor] | None = None  # per scale (B, T, *S): the teacher's (``teacher_input``)


@dataclass
class _StepInputs:
    """The input groups of one backbone pass (labeled batch, labeled mix, unlabeled mix), their prompts and
    task-recognition targets, and the labeled batch's targets per scale (local classes, any foreground)."""
    inputs: list[torch.Tensor]
    prompts: list[torch.Tensor]
    rec_targets: list[torch.Tensor]
    tasks: torch.Tensor
    local: list[torch.Tensor]
    fg: list[torch.Tensor]
    mix: _LabeledMix | None = None
    unlabeled: _UnlabeledMix | None = None


class VerSemiTrainer(nnUNetTrainer):
    """VerSemi (Lu et al., "Segment Together", IEEE TMI 2025) on nnU-Net's planned U-Net.

    Per iteration, one backbone pass over [labeled batch; CutMix of its two halves; CutMix of unlabeled
    images] feeds the prompt-conditioned head (see ``network/head.py``):
      L_sup   Dice+CE of each labeled case under its own task prompt (nnU-Net's loss, deep supervision)
      L_syn   Dice+CE of the synthetic prompt on the labeled mix vs the union foreground of both parts
      L_spec  Dice+CE of a's / b's prompt on the labeled mix vs a's foreground outside / b's inside the box
      L_unsup squared soft Dice of the synthetic prompt on the unlabeled mix vs P_agg, the max over every
              task head of its foreground probability (with ``unsup_aggregate = "source"``: each region of
              the mix from its own source task's head), on the samples whose P_agg holds foreground
      L_pseudo (not in the paper; ``pseudo_weight``) cross-entropy of each region's own task head on the
              unlabeled mix vs the EMA teacher's labels for that head on the unmixed images, over the voxels
              whose label has probability >= ``pseudo_threshold`` (None: every voxel, Dice + CE)
      L_cons  soft Dice of the synthetic prompt vs the known foreground on the labeled part of an
              unlabeled+labeled mix (only with ``unlabeled_mix = "labeled"``)
      L_rec   cross-entropy of the task classifier (which task an image comes from) on every image of the
              pass; a CutMix composite's target shares its tasks by area. Not part of the paper: it lets the
              prompt-free forward (stock nnUNetv2_predict) route each patch to its own task's head
    loss = w_sup L_sup + w_syn L_syn + w_spec L_spec + lambda(epoch) (w_unsup L_unsup + w_pseudo L_pseudo
           + w_cons L_cons)
           + w_rec L_rec.

    Paper/official code: Adam 1e-3, batch 8+8, 96^3, no augmentation, stage 1 (labeled only, r = 2/3)
    then stage 2 (r ~ U(0.3, 0.6), no L_spec), consistency target with gradient on both sides.
    Deviations, each an attribute:
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
      - ``static_head`` (class attribute): a static per-prompt output layer beside the dynamic convs;
      - ``dice_present_classes_only``: the Dice of the hard-label terms averages over the classes present in
        the target, so a small class that most batches of a union lack is not pushed to zero;
      - hard-label terms use nnU-Net's Dice+CE instead of the official Dice only;
      - one CutMix box per pair instead of one per batch; labeled pairs cross tasks whenever possible.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # validate before nnU-Net creates output folders and log files
        table = TaskTable.from_plans(plans)
        check_table_against_dataset(table, dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type != "cuda":
            # nnU-Net takes DDP to mean CUDA and moves every rank to cuda:<rank>; a CPU process group (gloo, as in
            # the tests) keeps the device it was given, without a gradient scaler
            self.device, self.grad_scaler = device, None
        self.task_table = table
        self._set_hyperparameters()

        self.ema_network: VerSemiNetwork | None = None
        self.recognition_optimizer: torch.optim.Optimizer | None = None
        self.dataloader_unlabeled = None
        self.global_step = 0
        self.switch_epoch: int | None = None  # first epoch with the unlabeled terms on (None: stage 1)
        self.validation_fallback: list[str] = []  # tasks validated on training cases in this fold (do_split)
        self._empty_epochs = 0
        self._uses_unlabeled = None  # -> initialize
        for key in (*LOSS_TERMS, *STAT_KEYS, REC_KEY):
            self.logger.local_logger.my_fantastic_logging.setdefault(f"versemi_{key}", [])

    def _set_hyperparameters(self) -> None:
        """VerSemi's hyperparameters and their defaults (ablations and short runs are subclasses that change
        them after ``__init__``; ``initialize()`` validates them)."""
        self.labeled_balance = "tasks"  # or "cases" (tasks in proportion to their labeled case counts)
        self.unlabeled_batch_size: int | None = None  # None: the labeled batch size
        self.sup_weight = 1.0
        self.syn_weight = 1.0
        self.spec_weight = 1.0
        self.unsup_weight = 1.0
        self.cons_weight = 1.0
        # w_pseudo: CutMix self-training of each region's own task head on the EMA teacher's confident labels
        # (not in the paper; +2.1 Dice points over 3 seeds at 10 % labels, docs/BENCHMARKS.md; 0: the paper's terms)
        self.pseudo_weight = 1.0
        # None: every voxel's hard pseudo label counts (Dice + CE); a number: only voxels whose pseudo label has at
        # least this probability count, in a cross-entropy (the voxels below are ignored)
        self.pseudo_threshold: float | None = 0.9
        self.unsup_aggregate = "all"  # P_agg: max over every task head (paper); "source": each region's own head
        self.labeled_box_ratio = (2 / 3, 2 / 3)
        self.unlabeled_box_ratio = (0.3, 0.6)
        self.unlabeled_mix = "unlabeled"  # or "labeled"
        self.target_source = "ema"  # teacher of P_agg and of the pseudo labels; or "detach" or "gradient"
        # with the EMA teacher: "unmixed": it predicts the two unmixed images once per step and P_agg, like the
        # pseudo labels, is the CutMix of its predictions; "mixed": it also predicts the mix, for P_agg (two passes)
        self.teacher_input = "unmixed"
        self.ema_alpha = 0.99
        self.unsup_schedule = "stage"  # or "ramp"
        self.rampup_fraction = 0.2
        self.stage1_fraction = 0.5  # stage 2 starts at the latest after this fraction of the epochs
        self.stage1_min_fraction = 0.1  # ... and not before this fraction
        self.switch_dice = 0.5  # ... once every task's online pseudo Dice reaches this
        self.unsup_min_foreground = 1e-3  # guard: fraction of voxels with P_agg > 0.5 a sample needs
        self.empty_warning_epochs = 3  # warn when P_agg stays empty for this many stage-2 epochs
        # Dice of the hard-label terms over the classes present in the target (False: nnU-Net's Dice, which lets
        # a small class of one task collapse to zero in a union; docs/METHOD.md)
        self.dice_present_classes_only = True
        self.allow_labeled_only = False  # True: train without unlabeled images (logged), instead of failing
        self.recognition_weight = 1.0  # w_rec
        # None: the task classifier learns with nnU-Net's SGD like every other layer; a number: it gets its own
        # Adam with this learning rate, outside nnU-Net's gradient clipping (only with recognition_detach)
        self.recognition_lr: float | None = None
        # False: the recognition loss reaches the backbone too (docs/METHOD.md: measured, not needed)
        self.recognition_detach = True
        # final validation: a case whose recognised task has a mean probability below this gets a warning
        self.recognition_threshold = 0.5
        self.validate_prompted_too = True  # final validation also under each case's own prompt (extra entry)

    # structure, not a training hyperparameter: nnU-Net's predictors rebuild the network from the class alone
    static_head = True
    # what the task classifier reads: the pooled features of every encoder stage, or ("bottleneck") of the
    # bottleneck alone (docs/METHOD.md: measured)
    recognition_input = "stages"

    # ------------------------------------------------------------------------------------------ network
    @classmethod
    @override
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> VerSemiNetwork:
        table = TaskTable.from_plans(plans_manager.plans)
        if num_output_channels != table.num_merged_labels:
            raise TaskTableError(
                f"The plans' task table defines {table.num_merged_labels} merged labels but the dataset has "
                f"{num_output_channels} outputs: plans and dataset.json disagree"
            )
        backbone = get_network_from_plans(
            configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, 2,
            allow_init=True, deep_supervision=enable_deep_supervision)
        return VerSemiNetwork(backbone, table.num_classes_per_prompt(), [t.merged_values for t in table.tasks],
                              static_head=cls.static_head, recognition_input=cls.recognition_input)

    @override
    def configure_optimizers(self):
        """nnU-Net's optimizer and schedule; with ``recognition_lr`` (and ``recognition_detach``) the task
        classifier leaves them for an Adam of its own."""
        optimizer, scheduler = super().configure_optimizers()
        if self.recognition_lr is not None and self.recognition_detach:
            classifier = list(self._plain_network().task_classifier.parameters())
            ids = {id(p) for p in classifier}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            self.recognition_optimizer = torch.optim.Adam(classifier, lr=self.recognition_lr)
        return optimizer, scheduler

    def _clipped_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters nnU-Net's optimizer steps (its gradient clipping applies to these)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _plain_network(self) -> VerSemiNetwork:
        mod = self.network.module if isinstance(self.network, DDP) else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    @override
    def initialize(self):
        self._validate_hyperparameters()
        self._uses_unlabeled = self.unsup_weight > 0 or self.pseudo_weight > 0 or (
            self.cons_weight > 0 and self.unlabeled_mix == "labeled")
        self._check_unlabeled_images()
        with _ddp_without_device_ids(self.device):
            super().initialize()
        self._plain_network().recognition_detach = bool(self.recognition_detach)
        tables = self.task_table
        device = self.device
        n_max = max(tables.num_classes_per_prompt())
        self._num_classes = tables.num_classes_per_prompt()
        class_valid = torch.zeros((tables.num_tasks, n_max), dtype=torch.bool)
        for ti, t in enumerate(tables.tasks):
            class_valid[ti, :t.num_classes] = True
        self._merged_to_local = torch.from_numpy(tables.merged_to_local_lut()).to(device)
        self._local_to_merged = torch.from_numpy(tables.local_to_merged_lut()).to(device)
        self._class_valid = class_valid.to(device)
        self._ds_weights = losses.deep_supervision_weights(
            len(self._get_deep_supervision_scales()) if self.enable_deep_supervision else 1)
        if self.target_source == "ema" and self._uses_unlabeled:
            self.ema_network = copy.deepcopy(self._plain_network()).eval()
            for p in self.ema_network.parameters():
                p.requires_grad_(False)

    def _validate_hyperparameters(self) -> None:
        """Clear errors for attributes a subclass or user set to values the step cannot run with."""
        if self.unsup_aggregate not in ("source", "all"):
            raise ValueError(f"unsup_aggregate must be 'source' or 'all', got {self.unsup_aggregate!r}")
        if self.unlabeled_mix not in ("unlabeled", "labeled"):
            raise ValueError(f"unlabeled_mix must be 'unlabeled' or 'labeled', got {self.unlabeled_mix!r}")
        if self.target_source not in ("detach", "ema", "gradient"):
            raise ValueError(f"target_source must be 'detach', 'ema' or 'gradient', got {self.target_source!r}")
        if self.teacher_input not in ("unmixed", "mixed"):
            raise ValueError(f"teacher_input must be 'unmixed' or 'mixed', got {self.teacher_input!r}")
        if self.unsup_schedule not in ("ramp", "stage"):
            raise ValueError(f"unsup_schedule must be 'ramp' or 'stage', got {self.unsup_schedule!r}")
        self._check_schedule()
        t = self.pseudo_threshold
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t < 1):
            raise ValueError(f"{type(self).__name__}.pseudo_threshold must be None or a number in (0, 1), got {t!r}")
        a = self.ema_alpha
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 <= a < 1:
            raise ValueError(f"{type(self).__name__}.ema_alpha must be a number in [0, 1), got {a!r}")
        for name in ("pseudo_weight", "recognition_weight", "recognition_lr"):
            v = getattr(self, name)
            if (v is not None or name != "recognition_lr") and (
                    not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{type(self).__name__}.{name} must be a number >= 0, got {v!r}")

    def _check_unlabeled_images(self) -> None:
        """The unlabeled images the loss terms need are preprocessed, all of them (or, with
        ``allow_labeled_only``, training goes on labeled-only, logged)."""
        if self._uses_unlabeled and not self._unlabeled_cases():
            if not self.allow_labeled_only:
                raise FileNotFoundError(
                    f"No preprocessed unlabeled images in {self._unlabeled_dir()}. Run "
                    f"nnUNetv2_versemi_plan_and_preprocess -d {self.plans_manager.dataset_name} -c "
                    f"{self.configuration_name}, or train {self.__class__.__name__}_noUnsup (labeled only)."
                )
            self.print_to_log_file("WARNING: no unlabeled images; training labeled-only as allowed by "
                                   "allow_labeled_only")
            self._uses_unlabeled = False
        if self._uses_unlabeled:
            missing = missing_unlabeled(self.preprocessed_dataset_folder_base,
                                        self.configuration_manager.data_identifier, self.task_table)
            if missing:
                # e.g. a plan_and_preprocess killed during the unlabeled step: training on the part that was
                # written would silently drop tasks from the unlabeled pool
                raise FileNotFoundError(
                    f"{len(missing)} unlabeled case(s) of the task table are not preprocessed in "
                    f"{self._unlabeled_dir()}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. "
                    f"Run nnUNetv2_versemi_plan_and_preprocess -d {self.plans_manager.dataset_name} -c "
                    f"{self.configuration_name} --only-unlabeled")

    # --------------------------------------------------------------------------------------------- data
    @override
    def do_split(self):
        """nnU-Net's split, with every task validated: a task without a validation case in this fold (one
        labeled case, or a hand-made split) validates on its training cases, as fold ``all`` does; the log and
        the final validation's summary.json say so. Runs in the main process, before any worker starts."""
        tr_keys, val_keys = super().do_split()
        if not tr_keys:
            raise ValueError(f"Fold {self.fold} of {self.plans_manager.dataset_name} has no training case. Check "
                             f"{join(self.preprocessed_dataset_folder_base, 'splits_final.json')} or train fold all")
        val_keys, fallback = complete_validation(tr_keys, val_keys, self.task_table)
        if fallback and fallback != self.validation_fallback:
            self.print_to_log_file(
                f"WARNING: fold {self.fold} has no validation case of task(s) {', '.join(fallback)}: they are "
                "validated on their training cases (like fold 'all'), so their pseudo Dice and final validation "
                "measure training fit, not generalisation. More labeled cases per task avoid this.")
        self.validation_fallback = fallback
        return tr_keys, val_keys

    def _unlabeled_dir(self) -> str:
        return unlabeled_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)

    def _unlabeled_cases(self) -> list[str]:
        folder = self._unlabeled_dir()
        if not isdir(folder):
            return []
        return infer_dataset_class(folder).get_identifiers(folder)

    def _augmenter(self, loader, training: bool):
        n = get_allowed_n_proc_DA()
        if n == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(
            data_loader=loader, transform=None,
            num_processes=n if training else max(1, n // 2),
            num_cached=max(6, n // 2) if training else max(3, n // 4), seeds=None,
            pin_memory=self.device.type == "cuda", wait_time=0.002)

    @override
    def get_dataloaders(self):
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        cm, lm = self.configuration_manager, self.label_manager
        ds_scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        tr_transforms = self.get_training_transforms(
            cm.patch_size, rotation, ds_scales, mirror_axes, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
            is_cascaded=False, foreground_labels=lm.foreground_labels, regions=None, ignore_label=lm.ignore_label)
        val_transforms = self.get_validation_transforms(
            ds_scales, is_cascaded=False, foreground_labels=lm.foreground_labels, regions=None,
            ignore_label=lm.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        case_tasks = {k: self.task_table.task_of_case(k)
                      for k in (*dataset_tr.identifiers, *dataset_val.identifiers)}
        common = dict(case_tasks=case_tasks, num_tasks=self.task_table.num_tasks,
                      oversample_foreground_percent=self.oversample_foreground_percent,
                      probabilistic_oversampling=self.probabilistic_oversampling)
        dl_tr = TaskBalancedDataLoader(dataset_tr, self.batch_size, initial_patch_size, cm.patch_size, lm,
                                       transforms=tr_transforms, balance=self.labeled_balance, **common)
        # validation batches are task balanced too, so every task gets an online pseudo Dice
        dl_val = TaskBalancedDataLoader(dataset_val, self.batch_size, cm.patch_size, cm.patch_size, lm,
                                        transforms=val_transforms, balance="tasks", pair_different_tasks=False,
                                        **common)
        mt_train, mt_val = self._augmenter(dl_tr, True), self._augmenter(dl_val, False)
        if self._uses_unlabeled:
            # nnU-Net's spatial and intensity augmentation; nothing that needs a segmentation
            u_transforms = self.get_training_transforms(
                cm.patch_size, rotation, None, mirror_axes, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
                is_cascaded=False, foreground_labels=lm.foreground_labels, regions=None, ignore_label=None)
            folder = self._unlabeled_dir()
            world, rank = (dist.get_world_size(), dist.get_rank()) if self.is_ddp else (1, 0)
            dataset_class = infer_dataset_class(folder)
            shard = self._unlabeled_shard(dataset_class.get_identifiers(folder), world, rank)
            dataset_u = dataset_class(folder, shard)
            global_u = self.unlabeled_batch_size or self.configuration_manager.batch_size
            dl_u = nnUNetDataLoader(dataset_u, split_global_batch(global_u, world, rank), initial_patch_size,
                                    cm.patch_size, lm, oversample_foreground_percent=0.0, transforms=u_transforms)
            self.dataloader_unlabeled = self._augmenter(dl_u, True)
            _ = next(self.dataloader_unlabeled)
        _ = next(mt_train)
        _ = next(mt_val)
        return mt_train, mt_val

    @staticmethod
    def _unlabeled_shard(identifiers: list[str], world: int, rank: int) -> list[str]:
        """This rank's share of the unlabeled pool: every world-th case of the sorted pool, so ranks never draw
        the same unlabeled image in a step, whatever their random states (the whole pool when it has fewer
        cases than ranks)."""
        identifiers = sorted(identifiers)
        return identifiers[rank::world] if len(identifiers) >= world else identifiers

    @override
    def on_train_start(self):
        super().on_train_start()
        if self.ema_network is not None and self.global_step == 0:
            # nnU-Net loads -pretrained_weights into the student after initialize() made the teacher: a fresh
            # training's teacher starts as the student it will follow (a warm start's loaded weights)
            self.ema_network.load_state_dict(self._plain_network().state_dict())

    @override
    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()
        self.dataloader_unlabeled = None

    # ------------------------------------------------------------------------------------------ schedule
    def _check_schedule(self) -> None:
        for name in ("stage1_fraction", "stage1_min_fraction", "switch_dice", "unsup_min_foreground",
                     "rampup_fraction", "recognition_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a number in [0, 1], got {v!r}")
        if self.stage1_min_fraction > self.stage1_fraction:
            raise ValueError(f"{type(self).__name__}.stage1_min_fraction ({self.stage1_min_fraction}) must not "
                             f"exceed stage1_fraction ({self.stage1_fraction})")
        if not isinstance(self.empty_warning_epochs, int) or self.empty_warning_epochs < 1:
            raise ValueError(f"{type(self).__name__}.empty_warning_epochs must be a positive integer, got "
                             f"{self.empty_warning_epochs!r}")

    def unlabeled_weight(self, epoch: int | None = None) -> float:
        """lambda(epoch): weight of L_unsup and L_cons; 0 before the switch (stage 1), then 1 ("stage") or a
        sigmoid ramp from the switch epoch over ``rampup_fraction`` of the epochs ("ramp")."""
        if not self._uses_unlabeled or self.switch_epoch is None:
            return 0.0
        epoch = self.current_epoch if epoch is None else epoch
        if epoch < self.switch_epoch:
            return 0.0
        if self.unsup_schedule == "stage" or self.rampup_fraction <= 0:
            return 1.0
        return sigmoid_rampup((epoch - self.switch_epoch) / (self.rampup_fraction * max(1, self.num_epochs)))

    def per_task_pseudo_dice(self, step: int = -1) -> dict[str, float]:
        """Online pseudo Dice per task (mean over its classes) of an epoch's validation batches."""
        # NaN when none of the task's classes was in the epoch's validation patches: never counts as good
        return self.task_table.per_task_mean(self.logger.get_value("dice_per_class_or_region", step=step))

    def maybe_switch(self) -> None:
        """After an epoch's validation: decide whether the unlabeled terms start with the next epoch.

        Evidence first: every task's online pseudo Dice >= ``switch_dice`` (so P_agg is not empty), not
        before ``stage1_min_fraction`` of the epochs; at ``stage1_fraction`` the switch happens regardless
        (the L_unsup guard then skips empty targets) and the tasks still below the threshold are named.
        """
        if not self._uses_unlabeled or self.switch_epoch is not None:
            return
        nxt = self.current_epoch + 1
        if nxt >= self.num_epochs:
            return
        dice = self.per_task_pseudo_dice()
        below = [k for k, v in dice.items() if not v >= self.switch_dice]
        due = nxt >= self.stage1_min_fraction * self.num_epochs and (
            not below or nxt >= self.stage1_fraction * self.num_epochs)
        if not self._rank_zero_decides(due):
            return
        self.switch_epoch = nxt
        why = (f"every task's pseudo Dice >= {self.switch_dice}" if not below else
               f"epoch limit stage1_fraction={self.stage1_fraction} reached; below {self.switch_dice}: "
               f"{', '.join(below)}")
        self.print_to_log_file(
            f"VerSemi: unlabeled terms on from epoch {nxt} (step {nxt * self.num_iterations_per_epoch}): {why}. "
            f"Pseudo Dice per task: { {k: round(v, 4) for k, v in dice.items()} }")

    def _rank_zero_decides(self, decision: bool) -> bool:
        """Rank 0's decision on every rank (DDP): the switch changes the loss graph, and ranks that switched at
        different epochs would train different models with one averaged gradient."""
        if not self.is_ddp:
            return decision
        shared = [decision]
        dist.broadcast_object_list(shared, src=0)
        return bool(shared[0])

    def _in_stage_two(self) -> bool:
        return self.unsup_schedule == "stage" and self.switch_epoch is not None \
            and self.current_epoch >= self.switch_epoch

    # ---------------------------------------------------------------------------------------- training
    @override
    def _build_loss(self):
        """nnU-Net's Dice + CE (deep supervision); with ``dice_present_classes_only`` its Dice averages only over
        the classes present in the target (see :class:`losses.PresentClassDiceLoss`)."""
        # under DDP each rank's batch Dice stays its own (DDP averages the gradients): the loss is called once
        # per task present in a rank's batch, with that task's classes, so the ranks' calls do not pair up in
        # the all-gather nnU-Net's Dice would make
        if not self.dice_present_classes_only or self.label_manager.has_regions:
            loss = super()._build_loss()
            inner = getattr(loss, "loss", loss)  # DeepSupervisionWrapper holds nnU-Net's DC_and_CE_loss
            getattr(inner.dc, "_orig_mod", inner.dc).ddp = False  # nnU-Net may have compiled its Dice
            return loss
        return losses.present_class_dice_ce(
            self.configuration_manager.batch_dice, self.label_manager.ignore_label, self.is_ddp,
            len(self._get_deep_supervision_scales()) if self.enable_deep_supervision else None, gather_dice=False)

    def _hard_loss(self, logits: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        if self.enable_deep_supervision:
            return self.loss(logits, targets)
        return self.loss(logits[0], targets[0])

    def _task_ids(self, keys) -> torch.Tensor:
        return torch.tensor([self.task_table.task_of_case(k) for k in keys], device=self.device)

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in (target if isinstance(target, list) else [target])]
        return data, target, self._task_ids(batch["keys"])

    @override
    def train_step(self, batch: dict) -> dict:
        """One VerSemi step: assemble the inputs of the one backbone pass (labeled batch, labeled CutMix,
        unlabeled CutMix), compute the loss terms from its outputs, and take nnU-Net's optimizer step."""
        data, target, tasks = self._to_device(batch)
        lam = self.unlabeled_weight()
        step = _StepInputs(inputs=[data], prompts=[tasks[:, None]],
                           rec_targets=[F.one_hot(tasks, self.task_table.num_tasks).float()],
                           tasks=tasks, local=[self._merged_to_local[t.long()] for t in target],
                           fg=[(t > 0).long() for t in target])
        self._add_labeled_mix(step, data)
        if lam > 0:
            self._add_unlabeled_mix(step, data, tasks)

        self.optimizer.zero_grad(set_to_none=True)
        if self.recognition_optimizer is not None:
            self.recognition_optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            outs, task_logits = self.network(torch.cat(step.inputs), step.prompts, recognition=True)
            terms, stats = self._loss_terms(step, outs, task_logits, lam)
            weights = dict(sup=self.sup_weight, syn=self.syn_weight, spec=self.spec_weight,
                           unsup=self.unsup_weight * lam, pseudo=self.pseudo_weight * lam, cons=self.cons_weight * lam,
                           rec=self.recognition_weight)
            loss = sum(weights[k] * v for k, v in terms.items())
        self._optimizer_step(loss)

        out = {"loss": loss.detach().cpu().numpy(), "unsup_lambda": np.array(lam),
               "unsup_kept": np.array(stats.get("unsup_kept", np.nan)),
               "task_fg": stats.get("task_fg", np.full(self.task_table.num_tasks, np.nan))}
        for k in LOSS_TERMS:
            out[k] = terms[k].detach().cpu().numpy() if k in terms else np.array(np.nan)
        return out

    def _add_labeled_mix(self, step: _StepInputs, data: torch.Tensor) -> None:
        """The labeled CutMix: halves a and b of the batch, a outside the box, b inside; prompts (synthetic,
        a's task, b's task) and the targets of L_syn and L_spec, per deep-supervision scale."""
        half = data.shape[0] // 2
        if half == 0 or (self.syn_weight <= 0 and self.spec_weight <= 0):
            return
        tasks, T = step.tasks, self.task_table.num_tasks
        a, b = slice(0, half), slice(half, 2 * half)
        spatial = data.shape[2:]
        ratio = self.unlabeled_box_ratio if self._in_stage_two() else self.labeled_box_ratio
        m = cutmix.box_masks(cutmix.draw_boxes(half, spatial, ratio), spatial, self.device)
        ms = [cutmix.resize_mask(m, f.shape[2:]) for f in step.fg]
        step.inputs.append(cutmix.mix(data[a], data[b], m))
        step.rec_targets.append(area_mixed_tasks(tasks[a], tasks[b], m, T))
        step.prompts.append(torch.stack((torch.full_like(tasks[a], self.task_table.synthetic_prompt), tasks[a],
                                         tasks[b]), dim=1))
        same = (tasks[a] == tasks[b]).view(-1, *[1] * (data.ndim - 1))
        both = [cutmix.mix(lc[a], lc[b], mm) for lc, mm in zip(step.local, ms)]
        step.mix = _LabeledMix(
            half=half,
            syn=[cutmix.mix(f[a], f[b], mm) for f, mm in zip(step.fg, ms)],
            spec_a=[torch.where(same, y, cutmix.mix(lc[a], torch.zeros_like(lc[a]), mm))
                    for y, lc, mm in zip(both, step.local, ms)],
            spec_b=[torch.where(same, y, cutmix.mix(torch.zeros_like(lc[b]), lc[b], mm))
                    for y, lc, mm in zip(both, step.local, ms)])

    def _add_unlabeled_mix(self, step: _StepInputs, data: torch.Tensor, tasks: torch.Tensor) -> None:
        """The unlabeled CutMix (with another unlabeled image, or a labeled one with ``unlabeled_mix =
        "labeled"``), prompted with every task and the synthetic task, and the pseudo labels of L_pseudo."""
        batch_u = next(self.dataloader_unlabeled)
        u = batch_u["data"].to(self.device, non_blocking=True)
        u_tasks = self._task_ids(batch_u["keys"])
        spatial = data.shape[2:]
        mu = cutmix.box_masks(cutmix.draw_boxes(u.shape[0], spatial, self.unlabeled_box_ratio), spatial, self.device)
        partner_idx = None
        if self.unlabeled_mix == "labeled":
            partner_idx = torch.randint(0, data.shape[0], (u.shape[0],), device=self.device)
            partner, partner_tasks = data[partner_idx], tasks[partner_idx]
        else:
            partner, partner_tasks = u.roll(1, dims=0), u_tasks.roll(1, dims=0)
        x_u = cutmix.mix(u, partner, mu)
        step.inputs.append(x_u)
        step.rec_targets.append(area_mixed_tasks(u_tasks, partner_tasks, mu, self.task_table.num_tasks))
        synthetic = torch.full((u.shape[0], 1), self.task_table.synthetic_prompt, device=self.device)
        if self._student_makes_p_agg():
            task_prompts = self._plain_network().task_prompts(u.shape[0], self.device)
        else:  # the student's task heads serve L_pseudo only: each region's own
            task_prompts = torch.stack((u_tasks, partner_tasks), dim=1)
        step.prompts.append(torch.cat((task_prompts, synthetic), dim=1))
        pseudo = task_fg = None
        if self.pseudo_weight > 0 or self.target_source == "ema":
            teacher_on_mix = self.target_source == "ema" and self.teacher_input == "mixed"
            unmixed, mixed = self._target_predictions(u, partner, x_u if teacher_on_mix else None,
                                                      self.pseudo_weight > 0 or not teacher_on_mix)
            if self.pseudo_weight > 0:
                pseudo = self._pseudo_targets(unmixed, u_tasks, partner_tasks, mu)
            if self.target_source == "ema":
                fg = [losses.task_foreground(o, self._num_classes[:-1]) for o in (mixed if teacher_on_mix else unmixed)]
                # on the unmixed images: cut together with the mix's box, as the input was
                task_fg = fg if teacher_on_mix else [
                    cutmix.mix(*self._own_and_partner(f, u.shape[0]), cutmix.resize_mask(mu, f.shape[2:])) for f in fg]
        step.unlabeled = _UnlabeledMix(x=x_u, mask=mu, tasks=u_tasks, partner_tasks=partner_tasks,
                                       partner_idx=partner_idx, pseudo=pseudo, task_fg=task_fg)

    def _student_makes_p_agg(self) -> bool:
        """Whether P_agg comes from the student's task heads on the mix (else from the EMA teacher), so that
        the student runs every task head there."""
        return self.target_source != "ema"

    def _own_and_partner(self, per_image: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps of the unmixed images (:meth:`_target_predictions` order) -> those of the images outside
        and inside the boxes of the n unlabeled mixes."""
        if self.unlabeled_mix == "unlabeled":
            return per_image, per_image.roll(1, dims=0)
        return per_image[:n], per_image[n:]

    def _loss_terms(self, step: _StepInputs, outs: list, task_logits: torch.Tensor, lam: float
                    ) -> tuple[dict[str, torch.Tensor], dict]:
        """Every loss term the step's inputs allow (outs: per input group, per scale), and the unlabeled
        statistics for the log."""
        terms, stats = {}, {}
        terms["rec"] = losses.soft_cross_entropy(task_logits, torch.cat(step.rec_targets))
        terms["sup"] = losses.prompted_supervised_loss([o[:, 0] for o in outs[0]], step.local, step.tasks,
                                                       self._num_classes, self._hard_loss)
        if step.mix is not None:
            mix, out_mix, tasks = step.mix, outs[1], step.tasks
            a, b = slice(0, mix.half), slice(mix.half, 2 * mix.half)
            terms["syn"] = self._hard_loss([o[:, 0, :2] for o in out_mix], mix.syn)
            if not self._in_stage_two():
                terms["spec"] = 0.5 * (
                    losses.prompted_supervised_loss([o[:, 1] for o in out_mix], mix.spec_a, tasks[a],
                                                    self._num_classes, self._hard_loss)
                    + losses.prompted_supervised_loss([o[:, 2] for o in out_mix], mix.spec_b, tasks[b],
                                                      self._num_classes, self._hard_loss))
        if lam > 0 and step.unlabeled is not None:
            un = step.unlabeled
            u_terms, stats = self._unlabeled_terms(outs[-1], un, step.fg)
            terms.update(u_terms)
            if un.pseudo is not None:
                terms["pseudo"] = self._pseudo_loss(outs[-1], un.pseudo, un.tasks, un.partner_tasks)
        return terms, stats

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        """nnU-Net's step, written out here because its own lives inside nnUNetTrainer.train_step with the
        forward pass: gradient scaler, clipping at 12 (of the parameters nnU-Net's optimizer owns), then the
        task classifier's own optimizer if it has one (``recognition_lr``), and the EMA teacher."""
        rec_opt = self.recognition_optimizer
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._clipped_parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            if rec_opt is not None:
                self.grad_scaler.step(rec_opt)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self._clipped_parameters(), 12)
            self.optimizer.step()
            if rec_opt is not None:
                rec_opt.step()
        self.global_step += 1
        if self.ema_network is not None:
            self._update_ema()

    def _unlabeled_terms(self, out_u: list[torch.Tensor], un: _UnlabeledMix, fg: list[torch.Tensor]
                         ) -> tuple[dict[str, torch.Tensor], dict]:
        """L_unsup (and L_cons), plus statistics for the log: the share of unlabeled samples the guard kept
        and, per task, the share of voxels its head calls foreground on the unlabeled mixes.

        Every task's foreground on the mix comes from the EMA teacher (on the unmixed images, CutMixed with
        the mix's box, or on the mix itself: ``teacher_input``) or from the student's own heads on the mix
        (``target_source``). P_agg: with ``unsup_aggregate = "source"`` each region of the mix takes the
        foreground of its own source task's head; with "all", the max over every task head, as in the paper."""
        T = self.task_table.num_tasks
        if un.task_fg is not None:  # the EMA teacher's
            task_fg = un.task_fg
        else:
            task_fg = [losses.task_foreground(o[:, :T] if self.target_source == "gradient" else o[:, :T].detach(),
                                              self._num_classes[:-1]) for o in out_u]
        if self.unsup_aggregate == "source":
            agg = [losses.source_task_foreground(f, un.tasks, un.partner_tasks,
                                                 cutmix.resize_mask(un.mask, f.shape[2:])) for f in task_fg]
        else:
            agg = [f.max(dim=1).values for f in task_fg]
        p_syn = [losses.foreground_probability(o[:, -1], 2) for o in out_u]  # the synthetic prompt comes last
        # the guard is decided once, at full resolution, and applies to every deep-supervision scale
        keep = losses.foreground_guard(agg[0], self.unsup_min_foreground)
        terms = {"unsup": losses.deep_supervision_sum(
            [losses.guarded_consistency_loss(p, q, keep) for p, q in zip(p_syn, agg)], self._ds_weights)}
        with torch.no_grad():
            stats = {"unsup_kept": keep.float().mean().item(),
                     "task_fg": (task_fg[0] > 0.5).flatten(2).float().mean(dim=(0, 2)).cpu().numpy()}
        if un.partner_idx is not None:
            # the box holds the labeled partner: its known foreground supervises the synthetic prompt there
            cons = []
            for p, f in zip(p_syn, fg):
                m = cutmix.resize_mask(un.mask, p.shape[1:])[:, 0]
                cons.append(losses.soft_dice_loss(p, f[un.partner_idx][:, 0], mask=m))
            terms["cons"] = losses.deep_supervision_sum(cons, self._ds_weights)
        return terms, stats

    @torch.no_grad()
    def _target_predictions(self, u: torch.Tensor, partner: torch.Tensor, mix: torch.Tensor | None = None,
                            unmixed: bool = True) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Every task head's output (per scale, (B', T, max_classes, *S)) on the unmixed images of the unlabeled
        mixes (the unlabeled batch, whose partners are the same images rolled by one, or the unlabeled batch
        followed by its labeled partners) and, if given, on the mixes themselves: one call for both. The EMA
        teacher's with ``target_source = "ema"``, else the student's without gradient. Returns (on the unmixed
        images, on the mixes), None for what was not asked."""
        net = self.ema_network if self.target_source == "ema" else self._plain_network()
        groups = [u if self.unlabeled_mix == "unlabeled" else torch.cat((u, partner))] if unmixed else []
        groups += [mix] if mix is not None else []
        x = torch.cat(groups)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out = net(x, net.task_prompts(x.shape[0], x.device))
        per_scale = [o.split([g.shape[0] for g in groups]) for o in (out if isinstance(out, (list, tuple)) else [out])]
        per_group = [[parts[i] for parts in per_scale] for i in range(len(groups))]
        return (per_group[0] if unmixed else None), (per_group[-1] if mix is not None else None)

    def _pseudo_targets(self, unmixed: list[torch.Tensor], u_tasks: torch.Tensor, partner_tasks: torch.Tensor,
                        mu: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Hard pseudo labels for L_pseudo from the heads' outputs on the unmixed images
        (:meth:`_target_predictions`), CutMixed with the same box as the input. Returns, per scale, the targets
        under the outside image's task and under the inside image's task, (B, 1, *S) each, in that task's local
        classes (-1 where the label's probability is below ``pseudo_threshold``)."""
        outside, inside = [], []
        n = u_tasks.shape[0]
        for o in unmixed:
            own, other = self._own_and_partner(
                torch.stack([self._confident_labels(o[:, t, :c]) for t, c in enumerate(self._num_classes[:-1])],
                            dim=1), n)  # (n, T, *S) each
            m = cutmix.resize_mask(mu, o.shape[3:])
            for tasks, store in ((u_tasks, outside), (partner_tasks, inside)):
                store.append(cutmix.mix(losses.pick_task(own, tasks), losses.pick_task(other, tasks), m))
        return outside, inside

    def _confident_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Hard labels of one head's logits (B, C, *S); -1 where their probability is below
        ``pseudo_threshold``."""
        if self.pseudo_threshold is None:
            return logits.argmax(1)
        conf, labels = torch.softmax(logits.float(), 1).max(1)
        return torch.where(conf >= self.pseudo_threshold, labels, torch.full_like(labels, -1))

    def _pseudo_loss(self, out_u: list[torch.Tensor], targets: tuple[list[torch.Tensor], list[torch.Tensor]],
                     u_tasks: torch.Tensor, partner_tasks: torch.Tensor) -> torch.Tensor:
        """L_pseudo: under the task of the image outside the box and under the task of the image inside it,
        the head's output on the mix matches the CutMix of that head's pseudo labels on the two unmixed
        images (nnU-Net's Dice + CE; with ``pseudo_threshold``, a cross-entropy over the confident voxels); the
        mean of both sides."""
        rows = torch.arange(u_tasks.shape[0], device=u_tasks.device)
        loss = self._hard_loss if self.pseudo_threshold is None else self._confident_ce
        # the student's heads on the mix: every task's (then each region's own is picked), or just the two own
        heads = (lambda o, side, tasks: o[rows, tasks]) if self._student_makes_p_agg() else \
            (lambda o, side, tasks: o[:, side])
        sides = [losses.prompted_supervised_loss([heads(o, side, tasks) for o in out_u], tgt, tasks,
                                                 self._num_classes, loss)
                 for side, (tasks, tgt) in enumerate(((u_tasks, targets[0]), (partner_tasks, targets[1])))]
        return 0.5 * (sides[0] + sides[1])

    def _confident_ce(self, logits: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """Cross-entropy per deep-supervision scale over the voxels with a pseudo label (target >= 0); a scale
        without any counts 0."""
        return losses.deep_supervision_sum(
            [losses.masked_cross_entropy(lg, tg[:, 0]) for lg, tg in zip(logits, targets)], self._ds_weights)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """teacher = alpha teacher + (1 - alpha) student for floating-point tensors (one fused op over all of
        them), copies of the others (e.g. BatchNorm's counters). Each tensor once: nnU-Net's decoder holds
        its encoder, so the state dict lists the encoder's tensors under several keys.

        Under DDP the student's buffers (the task classifier's running statistics) are first made rank 0's: each
        rank's forward updated them with its own batch, and DDP broadcasts them only at the next forward, after
        the teacher would have averaged in a different value on every rank."""
        if self.is_ddp:
            for buffer in self._plain_network().buffers():
                dist.broadcast(buffer, src=0)
        student = self._plain_network().state_dict()
        floats, targets, seen = [], [], set()
        for k, v in self.ema_network.state_dict(keep_vars=True).items():  # the tensors themselves: shared ones alike
            if id(v) in seen:
                continue
            seen.add(id(v))
            if v.dtype.is_floating_point:
                floats.append(v)
                targets.append(student[k].detach())
            else:
                v.copy_(student[k])
        torch._foreach_lerp_(floats, targets, 1 - self.ema_alpha)

    def _gather(self, vals: np.ndarray) -> np.ndarray:
        if not self.is_ddp:
            return vals
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, vals)
        return np.concatenate(gathered)

    @override
    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        for key in (*LOSS_TERMS, *STAT_KEYS):
            vals = self._gather(np.array([float(o[key]) for o in train_outputs]))
            value = float(np.nanmean(vals)) if np.any(np.isfinite(vals)) else float("nan")
            self.logger.log(f"versemi_{key}", value, self.current_epoch)
        task_fg = self._gather(np.stack([o["task_fg"] for o in train_outputs]))
        self._warn_if_empty(task_fg)

    def _warn_if_empty(self, task_fg: np.ndarray) -> None:
        """Stage 2 with an empty P_agg for ``empty_warning_epochs`` epochs in a row: say which task heads
        predict no foreground on the unlabeled images."""
        if not np.any(np.isfinite(task_fg)):
            return
        empty = ~(np.nan_to_num(task_fg, nan=0.0) > 0).any(axis=0)  # per task: no foreground all epoch
        kept = self.logger.get_value("versemi_unsup_kept", step=-1)
        self._empty_epochs = self._empty_epochs + 1 if (kept == 0 or empty.all()) else 0
        if self._empty_epochs >= self.empty_warning_epochs:
            names = [t.name for t, e in zip(self.task_table.tasks, empty) if e] or ["(none fully empty)"]
            self.print_to_log_file(
                f"WARNING: P_agg has been (almost) empty for {self._empty_epochs} epochs: L_unsup kept "
                f"{kept:.0%} of the unlabeled samples this epoch. Task heads with no foreground on the unlabeled "
                f"images: {', '.join(names)}. The unlabeled term teaches nothing until they predict foreground; "
                f"train longer before the switch (switch_dice, stage1_min_fraction) or check these tasks' labels.")

    # -------------------------------------------------------------------------------------- validation
    @override
    def validation_step(self, batch: dict) -> dict:
        data, target, tasks = self._to_device(batch)
        local = [self._merged_to_local[t.long()] for t in target]
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            outs, task_logits = self.network(data, tasks[:, None], recognition=True)
            loss = losses.prompted_supervised_loss([o[:, 0] for o in outs], local, tasks, self._num_classes,
                                                   self._hard_loss)
        T = self.task_table.num_tasks
        correct = torch.bincount(tasks[task_logits.argmax(1) == tasks], minlength=T)
        logits = outs[0][:, 0]
        valid = self._class_valid[tasks].view(*tasks.shape, -1, *[1] * (logits.ndim - 2))
        local_pred = logits.masked_fill(~valid, float("-inf")).argmax(1)
        merged_pred = torch.gather(self._local_to_merged[tasks], 1, local_pred.flatten(1)).view_as(local_pred)
        onehot = torch.zeros((logits.shape[0], self.task_table.num_merged_labels, *logits.shape[2:]),
                             device=logits.device, dtype=torch.float16)
        onehot.scatter_(1, merged_pred[:, None], 1)
        axes = [0] + list(range(2, logits.ndim))
        tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target[0], axes=axes)
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp.detach().cpu().numpy()[1:],
                "fp_hard": fp.detach().cpu().numpy()[1:], "fn_hard": fn.detach().cpu().numpy()[1:],
                "rec_correct": correct.cpu().numpy(), "rec_count": torch.bincount(tasks, minlength=T).cpu().numpy()}

    @override
    def on_validation_epoch_end(self, val_outputs: list[dict]):
        super().on_validation_epoch_end(val_outputs)
        self.print_to_log_file("Pseudo dice per task",
                               {k: np.round(v, 4) for k, v in self.per_task_pseudo_dice().items()})
        correct = self._gather(np.stack([o["rec_correct"] for o in val_outputs])).sum(0)
        count = self._gather(np.stack([o["rec_count"] for o in val_outputs])).sum(0)
        acc = [float(c / n) if n else float("nan") for c, n in zip(correct, count)]
        self.logger.log(f"versemi_{REC_KEY}", acc, self.current_epoch)
        self.print_to_log_file("Task recognition accuracy per task (validation patches)",
                               {t.name: round(a, 4) for t, a in zip(self.task_table.tasks, acc)})

    @override
    def on_epoch_end(self):
        # before nnU-Net's checkpointing in super(), so a checkpoint written now already holds the switch
        self.maybe_switch()
        super().on_epoch_end()
        if self.local_rank == 0:
            from nnunetv2_versemi.training.plotting import plot_versemi_progress

            plot_versemi_progress(self.logger.local_logger.my_fantastic_logging, self.task_table,
                                  join(self.output_folder, "progress_versemi.png"))

    @override
    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation of what stock ``nnUNetv2_predict`` writes: the prompt-free network, each
        patch routed to the task it is recognised as. So ``nnUNetv2_find_best_configuration``, post-processing
        and ensembling choose on the outputs users get. Added to summary.json: "versemi_per_task" (per-task
        means), "versemi_recognition" (the task recognised per case: mean probability over its patches) and,
        with ``validate_prompted_too``, "versemi_prompted" (each case under its own task's prompt; its files
        in validation_prompted/)."""
        net = self._plain_network()
        base = self.dataset_class or infer_dataset_class(self.preprocessed_dataset_folder)
        folder = join(self.output_folder, "validation")
        prompted = self._validate_prompted(base) if self.validate_prompted_too else None
        probs: dict[str, list[np.ndarray]] = {}
        current: list[str] = []

        def new_case(case: str) -> None:
            current[:] = [case]
            probs[case] = []

        def collect(module, args, output):
            if current and module.last_task_probabilities is not None:
                probs[current[0]].append(module.last_task_probabilities.cpu().numpy())

        hook = net.register_forward_hook(collect)
        try:
            with _dataset_hook(self, base, new_case):
                super().perform_actual_validation(save_probabilities)
        finally:
            hook.remove()
        if self.is_ddp:  # each rank predicted its share of the cases; rank 0 writes the report of all
            shares = [None] * dist.get_world_size()
            dist.all_gather_object(shares, probs)
            probs = {case: p for share in shares for case, p in share.items()}
        if self.local_rank == 0 and isfile(join(folder, "summary.json")):
            self._extend_summary(join(folder, "summary.json"), probs, prompted)

    def _validate_prompted(self, base: type) -> dict | None:
        """nnU-Net's final validation with each case under its own task's prompt, moved to
        validation_prompted/; returns its summary.json (None where this rank has none)."""
        net, table = self._plain_network(), self.task_table
        folder, prompted_folder = join(self.output_folder, "validation"), join(self.output_folder,
                                                                               "validation_prompted")
        prompted = None
        # nnU-Net loads each case right before predicting it: switch to the case's prompt there
        with net.prompted(None), _dataset_hook(self, base,
                                                lambda case: setattr(net, "prompt", table.task_of_case(case))):
            super().perform_actual_validation(False)
        if self.local_rank == 0 and isdir(folder):
            shutil.rmtree(prompted_folder, ignore_errors=True)
            os.replace(folder, prompted_folder)
            if isfile(join(prompted_folder, "summary.json")):
                prompted = load_json(join(prompted_folder, "summary.json"))
        if self.is_ddp:
            dist.barrier()
        return prompted

    def _extend_summary(self, summary_file: str, probs: dict[str, list[np.ndarray]], prompted: dict | None
                        ) -> None:
        """Adds the per-task means, the recognition report, the prompted validation and the fallback note to
        nnU-Net's summary.json, and logs the per-task Dice."""
        table = self.task_table
        summary = load_json(summary_file)
        summary["versemi_per_task"] = per_task_summary(summary, table)
        summary["versemi_recognition"] = self._recognition_report(probs)
        if prompted is not None:
            summary["versemi_prompted"] = {"folder": "validation_prompted",
                                           "foreground_mean": prompted["foreground_mean"],
                                           "per_task": per_task_summary(prompted, table)}
        if self.validation_fallback:
            summary["versemi_validation_fallback"] = {
                "tasks": self.validation_fallback,
                "note": f"fold {self.fold} has no validation case of these tasks: they were validated on "
                        "their training cases"}
        save_json(summary, summary_file, sort_keys=False)
        self.print_to_log_file("Validation Dice per task (stock prompt-free prediction):",
                               {k: v["Dice"] for k, v in summary["versemi_per_task"].items()})
        if prompted is not None:
            self.print_to_log_file("Validation Dice per task (each case under its own prompt):",
                                   {k: v["Dice"] for k, v in summary["versemi_prompted"]["per_task"].items()})

    def _recognition_report(self, probs: dict[str, list[np.ndarray]]) -> dict:
        """Per validation case: the task recognised (mean probability over the patches the network saw) against
        its true task; per task: the share of its cases recognised. Low-confidence cases are logged."""
        table, cases = self.task_table, {}
        if self._plain_network().routing != "recognised":
            return {"routing": self._plain_network().routing}
        for case, ps in probs.items():
            if not ps:
                continue
            mean = np.concatenate(ps).mean(0)
            t = int(mean.argmax())
            cases[case] = {"task": table.tasks[table.task_of_case(case)].name, "recognised": table.tasks[t].name,
                           "probability": round(float(mean[t]), 4)}
            if mean[t] < self.recognition_threshold:
                self.print_to_log_file(f"WARNING: case {case}: no task recognised with probability >= "
                                       f"{self.recognition_threshold} (best: {table.tasks[t].name}, {mean[t]:.2f})")
        accuracy = {}
        for task in table.tasks:
            own = [c for c in cases.values() if c["task"] == task.name]
            accuracy[task.name] = float(np.mean([c["recognised"] == task.name for c in own])) if own else None
        return {"routing": "recognised", "accuracy_per_task": accuracy, "cases": cases}

    # ------------------------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus a ``versemi`` entry, written to a temporary file and renamed into place,
        so a run killed mid-write leaves the previous checkpoint intact for ``--c``."""
        tmp = f"{filename}.tmp-{os.getpid()}"
        try:
            super().save_checkpoint(tmp)
            if not isfile(tmp):  # another rank, or checkpointing disabled
                return
            checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
            checkpoint["versemi"] = {
                "global_step": self.global_step,
                "switch_epoch": self.switch_epoch,
                "task_table": self.task_table.to_dict(),
                "ema_weights": self.ema_network.state_dict() if self.ema_network is not None else None,
                "recognition_optimizer": (self.recognition_optimizer.state_dict()
                                          if self.recognition_optimizer is not None else None),
            }
            torch.save(checkpoint, tmp)
            os.replace(tmp, filename)
        finally:
            if isfile(tmp):
                os.remove(tmp)

    @override
    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else torch.load(
            filename_or_checkpoint, map_location=self.device, weights_only=False)
        if self._plain_network().recognition_input != self.recognition_input:
            # the checkpoint's classifier has the bottleneck-only layout and replaced the built one: the
            # optimizers must hold the classifier that is now in the network
            self.optimizer, self.lr_scheduler = self.configure_optimizers()
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])
            self.print_to_log_file("The checkpoint's task classifier reads the bottleneck only: training goes "
                                   "on with that layout")
        state = checkpoint.get("versemi")
        if state is None:
            return
        if not TaskTable.from_dict(state["task_table"]).same_structure(self.task_table):
            raise TaskTableError("The checkpoint was trained on other tasks than the plans describe")
        self.global_step = state["global_step"]
        self.switch_epoch = state.get("switch_epoch")
        # checkpoints of earlier versions lack some per-epoch keys: pad them, nnU-Net's logger needs one per epoch
        log = self.logger.local_logger.my_fantastic_logging
        for key in (*LOSS_TERMS, *STAT_KEYS):
            vals = log.setdefault(f"versemi_{key}", [])
            vals.extend([float("nan")] * (self.current_epoch - len(vals)))
        vals = log.setdefault(f"versemi_{REC_KEY}", [])
        vals.extend([[float("nan")] * self.task_table.num_tasks] * (self.current_epoch - len(vals)))
        if self.ema_network is not None:
            # a checkpoint without a teacher (trained with another target_source): the teacher starts as the
            # loaded student, not as the initial weights it was copied from
            ema = state.get("ema_weights")
            self.ema_network.load_state_dict(ema if ema is not None else self._plain_network().state_dict())
        if self.recognition_optimizer is not None and state.get("recognition_optimizer") is not None:
            self.recognition_optimizer.load_state_dict(state["recognition_optimizer"])


@contextlib.contextmanager
def _ddp_without_device_ids(device: torch.device):
    """nnU-Net's ``initialize`` wraps the network in ``DDP(network, device_ids=[rank])``, which only a CUDA module
    accepts; a CPU module (a gloo process group) must come without device ids. nnU-Net has no hook for the
    wrapper, so its module's ``DDP`` name is swapped for the call."""
    if device.type == "cuda":
        yield
        return
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

    def cpu_ddp(module, device_ids=None, **kwargs):
        return DDP(module, **kwargs)

    nnunet_trainer_module.DDP = cpu_ddp
    try:
        yield
    finally:
        nnunet_trainer_module.DDP = DDP


@contextlib.contextmanager
def _dataset_hook(trainer: nnUNetTrainer, base: type, on_load: Callable[[str], None]):
    """Run ``on_load(case)`` whenever nnU-Net's final validation loads a case: it loads each case right before
    predicting it, in the main process, so this is where a per-case prompt or record starts."""

    class HookedDataset(base):
        def load_case(self, identifier):
            on_load(identifier)
            return super().load_case(identifier)

    trainer.dataset_class = HookedDataset
    try:
        yield
    finally:
        trainer.dataset_class = base


def area_mixed_tasks(outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor, num_tasks: int
                     ) -> torch.Tensor:
    """Task distribution of CutMix composites: each part's task weighted by its share of the patch (as CutMix
    mixes class labels). outside/inside (N,) task ids, mask (N, 1, *S) with 1 inside the box."""
    area = mask.flatten(1).float().mean(1, keepdim=True)
    return (1 - area) * F.one_hot(outside, num_tasks).float() + area * F.one_hot(inside, num_tasks).float()


def check_table_against_dataset(table: TaskTable, dataset_json: dict) -> None:
    """The plans' task table must describe the dataset being trained on."""
    ds_table = TaskTable.from_dataset_json(dataset_json)
    if not ds_table.same_structure(table):
        raise TaskTableError("The task table in the plans and the one in dataset.json disagree: re-run "
                             "nnUNetv2_versemi_plan_and_preprocess")
    labels = {k: int(v) for k, v in dataset_json["labels"].items()}
    if labels != table.merged_label_dict():
        raise TaskTableError(f"dataset.json labels {labels} do not match the task table's merged labels "
                             f"{table.merged_label_dict()}")


def per_task_summary(summary: dict, table: TaskTable) -> dict:
    """Mean Dice/IoU per task from nnU-Net's summary.json: each case on its own task's classes."""
    out = {}
    for ti, task in enumerate(table.tasks):
        per_class = {lab.name: {"Dice": [], "IoU": []} for lab in task.labels}
        for case in summary["metric_per_case"]:
            case_id = os.path.basename(case["reference_file"]).split(".")[0]
            if table.task_of_case(case_id) != ti:
                continue
            for lab in task.labels:
                m = case["metrics"].get(str(lab.merged)) or case["metrics"].get(lab.merged)
                if m is None:
                    continue
                for key in ("Dice", "IoU"):
                    per_class[lab.name][key].append(m[key])
        means = {name: {k: float(np.nanmean(v)) if v else float("nan") for k, v in vals.items()}
                 for name, vals in per_class.items()}
        out[task.name] = {
            "Dice": float(np.nanmean([m["Dice"] for m in means.values()])),
            "IoU": float(np.nanmean([m["IoU"] for m in means.values()])),
            "n_cases": len(next(iter(per_class.values()))["Dice"]),
            "per_class": means,
        }
    return out
