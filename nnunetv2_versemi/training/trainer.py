"""VerSemiTrainer: nnU-Net training with task prompts, the CutMix synthetic task and unlabeled consistency."""

from __future__ import annotations

import os
from os.path import isfile, join

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast
from torch import distributed as dist
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP
from typing_extensions import override

from nnunetv2_versemi.network.checkpoints import drop_mismatched_optimizer_state, logged_checkpoint_notices
from nnunetv2_versemi.network.head import VerSemiNetwork
from nnunetv2_versemi.tasktable import TaskTable, TaskTableError, check_table_against_dataset
from nnunetv2_versemi.training import epoch_log, losses, mixes
from nnunetv2_versemi.training.config import DEFAULT, VerSemiConfig
from nnunetv2_versemi.training.ddp import cpu_ddp_without_device_ids
from nnunetv2_versemi.training.loaders import TaskData
from nnunetv2_versemi.training.schedule import StageSchedule
from nnunetv2_versemi.training.teacher import EMATeacher, every_head
from nnunetv2_versemi.training.terms import LossTerms, step_record
from nnunetv2_versemi.training.validation import FinalValidation


class VerSemiTrainer(FinalValidation, TaskData, nnUNetTrainer):
    """VerSemi (Lu et al., "Segment Together", IEEE TMI 2025) on nnU-Net's planned U-Net.

    Each step (:meth:`train_step`) builds the named input groups of :mod:`.mixes` (the labeled batch, the CutMix
    of its two halves and, in stage 2, the CutMix of unlabeled images with the teacher's targets), runs one
    backbone pass over all of them into the prompt-conditioned head (``network/head.py``) and takes the loss
    terms of :mod:`.terms` by name:
        loss = w_sup L_sup + w_syn L_syn + w_spec L_spec
               + lambda(epoch) (w_unsup L_unsup + w_pseudo L_pseudo + w_cons L_cons) + w_rec L_rec.
    lambda and the two stages: :mod:`.schedule`; the EMA teacher: :mod:`.teacher`; every hyperparameter and each
    deviation from the paper: :mod:`.config` (``config``: a variant is the default with named changes,
    :mod:`.variants`); data: :mod:`.loaders`; final validation: :mod:`.validation`.
    """

    config: VerSemiConfig = DEFAULT  # an instance may replace its own (frozen) config before initialize()

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
        self.config = type(self).config
        if self.config.foreground_oversampling is not None:
            self.oversample_foreground_percent = self.config.foreground_oversampling
        self.teacher: EMATeacher | None = None
        self.recognition_optimizer: torch.optim.Optimizer | None = None
        self.global_step = 0
        self.schedule = StageSchedule(self.config, active=self.config.uses_unlabeled)
        self.validation_fallback: list[str] = []  # tasks validated on training cases in this fold (do_split)
        self._empty_epochs = 0
        self.uses_unlabeled: bool | None = None  # -> initialize
        epoch_log.add_keys(self.logger, table.num_tasks, epochs=0)

    @property
    def switch_epoch(self) -> int | None:
        """First epoch with the unlabeled terms on (None: stage 1); logged and stored in the checkpoint."""
        return self.schedule.switch_epoch

    @switch_epoch.setter
    def switch_epoch(self, epoch: int | None) -> None:
        self.schedule.switch_epoch = epoch

    @property
    def ema_network(self) -> VerSemiNetwork | None:
        return self.teacher.network if self.teacher is not None else None

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
                              static_head=cls.config.static_head, recognition_input=cls.config.recognition_input)

    @override
    def configure_optimizers(self):
        """nnU-Net's optimizer and schedule; with ``recognition_lr`` (and ``recognition_detach``) the task
        classifier leaves them for an Adam of its own."""
        optimizer, scheduler = super().configure_optimizers()
        if self.config.recognition_lr is not None and self.config.recognition_detach:
            classifier = list(self._plain_network().task_classifier.parameters())
            ids = {id(p) for p in classifier}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            self.recognition_optimizer = torch.optim.Adam(classifier, lr=self.config.recognition_lr)
        return optimizer, scheduler

    def _plain_network(self) -> VerSemiNetwork:
        mod = self.network.module if isinstance(self.network, DDP) else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    # ------------------------------------------------------------------------------------- batch, budget
    def batches_per_step(self) -> int:
        """Planned batches in one step: one per task with ``task_batches``, else one shared by every task."""
        return self.task_table.num_tasks if self.config.task_batches else 1

    @override
    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size *= self.batches_per_step()

    def _steps_for_task_batches(self) -> None:
        """With ``task_batches``: T times the batch in 1/T of the steps (rounded up), so every task sees as many
        patches as before and the learning-rate schedule spans the per-task number of steps; the step's loss
        counts T times (:meth:`train_step`)."""
        n = self.batches_per_step()
        if n == 1 or self.was_initialized:
            return
        before = (self.num_iterations_per_epoch, self.num_val_iterations_per_epoch)
        self.num_iterations_per_epoch = -(-before[0] // n)
        self.num_val_iterations_per_epoch = -(-before[1] // n)
        self.print_to_log_file(
            f"VerSemi: task batches: {self.configuration_manager.batch_size} patches per task and step, "
            f"{self.num_iterations_per_epoch} training / {self.num_val_iterations_per_epoch} validation steps per "
            f"epoch instead of {before[0]} / {before[1]}")

    @override
    def initialize(self):
        if not isinstance(self.config, VerSemiConfig):
            raise TypeError(f"{type(self).__name__}.config must be a VerSemiConfig, got {type(self.config).__name__}")
        self.uses_unlabeled = self.config.uses_unlabeled
        self._check_unlabeled_images()
        self._steps_for_task_batches()
        with cpu_ddp_without_device_ids(self.device):
            super().initialize()
        self.print_to_log_file("VerSemi config (changes from the default: "
                               f"{self.config.changes() or 'none'}):", self.config.to_dict())
        self.schedule = StageSchedule(self.config, active=self.uses_unlabeled)
        self._plain_network().recognition_detach = self.config.recognition_detach
        table = self.task_table
        self._num_classes = table.num_classes_per_prompt()
        class_valid = torch.zeros((table.num_tasks, max(self._num_classes)), dtype=torch.bool)
        for ti, t in enumerate(table.tasks):
            class_valid[ti, :t.num_classes] = True
        self._class_valid = class_valid.to(self.device)
        self._merged_to_local = torch.from_numpy(table.merged_to_local_lut()).to(self.device)
        self._local_to_merged = torch.from_numpy(table.local_to_merged_lut()).to(self.device)
        ds_weights = losses.deep_supervision_weights(
            len(self._get_deep_supervision_scales()) if self.enable_deep_supervision else 1)
        self.terms = LossTerms(self.config, self._num_classes, self._hard_loss, ds_weights)
        if self.config.target_source == "ema" and self.uses_unlabeled:
            self.teacher = EMATeacher(self._plain_network(), self.config.ema_alpha)

    @override
    def on_train_start(self):
        super().on_train_start()
        if self.teacher is not None and self.global_step == 0:
            # nnU-Net loads -pretrained_weights into the student after initialize() made the teacher: a fresh
            # training's teacher starts as the student it will follow (a warm start's loaded weights)
            self.teacher.follow(self._plain_network())

    # ------------------------------------------------------------------------------------------ schedule
    def unlabeled_weight(self, epoch: int | None = None) -> float:
        """lambda(epoch) (default: the current epoch)."""
        return self.schedule.unlabeled_weight(self.current_epoch if epoch is None else epoch, self.num_epochs)

    def _in_stage_two(self) -> bool:
        return self.schedule.in_stage_two(self.current_epoch)

    def per_task_pseudo_dice(self, step: int = -1) -> dict[str, float]:
        """Online pseudo Dice per task (mean over its classes) of an epoch's validation batches."""
        # NaN when none of the task's classes was in the epoch's validation patches: never counts as good
        return self.task_table.per_task_mean(self.logger.get_value("dice_per_class_or_region", step=step))

    def maybe_switch(self) -> None:
        """After an epoch's validation: whether the unlabeled terms start with the next epoch (rank 0's decision
        on every rank)."""
        if not self.schedule.active or self.switch_epoch is not None or self.current_epoch + 1 >= self.num_epochs:
            return
        dice = self.per_task_pseudo_dice()
        why = self.schedule.due(self.current_epoch, self.num_epochs, dice)
        if not self._rank_zero_decides(why is not None):
            return
        nxt = self.switch_epoch = self.current_epoch + 1
        self.print_to_log_file(
            f"VerSemi: unlabeled terms on from epoch {nxt} (step {nxt * self.num_iterations_per_epoch}): {why}. "
            f"Pseudo Dice per task: { {k: round(v, 4) for k, v in dice.items()} }")
        weak = self.schedule.below_switch(dice)
        if weak:
            self.print_to_log_file(
                f"WARNING: the unlabeled terms start before {', '.join(weak)} learned their foreground (pseudo Dice "
                f"below switch_dice={self.config.switch_dice}). The teacher's labels for these tasks' unlabeled "
                "images are then mostly background, which can hold them there. Train longer (more epochs, or a "
                "larger stage1_fraction) or check these tasks' labels.")

    def warn_unlearned_tasks(self) -> list[str]:
        """At the end of training: the tasks whose online pseudo Dice was 0 in each of the last
        ``empty_warning_epochs`` epochs (their heads predict none of their foreground, so the model segments
        nothing for them), named in a WARNING in the training log. NaN epochs (no class of the task in the
        validation patches) say nothing either way and are skipped."""
        history = self.logger.get_checkpoint().get("dice_per_class_or_region", [])
        n = self.config.empty_warning_epochs
        per_epoch = [self.task_table.per_task_mean(h) for h in history]
        dead = []
        for task in self.task_table.tasks:
            seen = [d[task.name] for d in per_epoch if not np.isnan(d[task.name])][-n:]
            if len(seen) == n and all(v == 0 for v in seen):
                dead.append(task.name)
        if dead:
            self.print_to_log_file(
                f"WARNING: {', '.join(dead)}: online pseudo Dice 0 in each of the last {n} epochs with a value. The "
                "model has not learned these tasks' foreground and will segment nothing for them. Train longer, or "
                "check these tasks' labels and the stage switch above.")
        return dead

    def _rank_zero_decides(self, decision: bool) -> bool:
        """Rank 0's decision on every rank (DDP): the switch changes the loss graph, and ranks that switched at
        different epochs would train different models with one averaged gradient."""
        if not self.is_ddp:
            return decision
        shared = [decision]
        dist.broadcast_object_list(shared, src=0)
        return bool(shared[0])

    # ---------------------------------------------------------------------------------------- training
    @override
    def _build_loss(self):
        """nnU-Net's Dice + CE (deep supervision), its Dice over the classes present in the target with
        ``dice_present_classes_only``. Under DDP each rank's batch Dice stays its own (DDP averages the
        gradients): the loss is called once per task present in a rank's batch, with that task's classes, so the
        ranks' calls do not pair up in the all-gather nnU-Net's Dice would make."""
        if self.label_manager.has_regions:
            return super()._build_loss()
        return losses.dice_ce(
            self.configuration_manager.batch_dice, self.label_manager.ignore_label, self.is_ddp,
            len(self._get_deep_supervision_scales()) if self.enable_deep_supervision else None, gather_dice=False,
            present_classes_only=self.config.dice_present_classes_only)

    def _hard_loss(self, logits: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        if self.enable_deep_supervision:
            return self.loss(logits, targets)
        return self.loss(logits[0], targets[0])

    def _task_ids(self, keys) -> torch.Tensor:
        return torch.tensor([self.task_table.task_of_case(k) for k in keys], device=self.device)

    def _to_device(self, batch: dict) -> tuple[mixes.LabeledBatch, list[torch.Tensor]]:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in (target if isinstance(target, list) else [target])]
        return mixes.LabeledBatch(x=data, tasks=self._task_ids(batch["keys"]), num_tasks=self.task_table.num_tasks,
                                  local=[self._merged_to_local[t.long()] for t in target],
                                  fg=[(t > 0).long() for t in target]), target

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    @override
    def train_step(self, batch: dict) -> dict:
        """One VerSemi step: build the mixes, one backbone pass, the loss terms by name, nnU-Net's optimizer
        step, the teacher's update."""
        labeled, _ = self._to_device(batch)
        # the closing phase of sup_finish_fraction: L_sup (and L_rec) alone, no mix is built
        finish = self.schedule.in_sup_finish(self.current_epoch, self.num_epochs)
        lam = 0.0 if finish else self.unlabeled_weight()
        step = mixes.StepGroups(labeled)
        if not finish and (self.config.syn_weight > 0 or self.config.spec_weight > 0):
            step.labeled_mix = mixes.labeled_mix(labeled, self.schedule.labeled_box_ratio(self.current_epoch),
                                                 self.task_table.synthetic_prompt)
        if lam > 0:
            step.unlabeled_mix = self._unlabeled_mix(labeled)

        self.optimizer.zero_grad(set_to_none=True)
        if self.recognition_optimizer is not None:
            self.recognition_optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            outputs, task_logits = step.forward(self.network)
            terms, stats = self.terms(step, outputs, task_logits, stage_two=self._in_stage_two())
            weights = self.terms.weights(lam)
            loss = sum(weights[k] * v for k, v in terms.items())
        # task batches: a step does the work of T steps of one planned batch, so it moves the weights as far (each
        # task's L_sup is then its per-task nnU-Net loss at full weight, as when the task trains alone)
        self._optimizer_step(loss * self.batches_per_step())
        if self.teacher is not None:
            self.teacher.update(self._plain_network(), self._sync_buffers if self.is_ddp else None)
        return step_record(loss, terms, stats, lam, self.task_table.num_tasks)

    def _unlabeled_mix(self, labeled: mixes.LabeledBatch) -> mixes.UnlabeledMix:
        """The unlabeled CutMix and its targets: L_pseudo's labels (``pseudo_weight``) and, with the EMA teacher,
        every task's foreground on the mix for P_agg, from the teacher's predictions on the unmixed images
        (``teacher_input = "unmixed"``) or on the mix itself ("mixed"); one forward pass for all of them."""
        c = self.config
        batch_u = next(self.dataloader_unlabeled)
        mix = mixes.unlabeled_mix(batch_u["data"].to(self.device, non_blocking=True), self._task_ids(batch_u["keys"]),
                                  labeled, c.unlabeled_box_ratio, c.unlabeled_mix,
                                  every_task_head=self.teacher is None, synthetic_prompt=self.task_table.synthetic_prompt)
        teacher_on_mix = self.teacher is not None and c.teacher_input == "mixed"
        need_unmixed = c.pseudo_weight > 0 or (self.teacher is not None and not teacher_on_mix)
        if not (need_unmixed or teacher_on_mix):
            return mix
        net = self.teacher.network if self.teacher is not None else self._plain_network()
        unmixed, on_mix = every_head(net, [mix.unmixed_images() if need_unmixed else None,
                                           mix.x if teacher_on_mix else None], self._autocast)
        if c.pseudo_weight > 0:
            mix.pseudo = mixes.pseudo_targets(mix, unmixed, self._num_classes[:-1], c.pseudo_threshold)
        if self.teacher is not None:
            fg = [losses.task_foreground(o, self._num_classes[:-1]) for o in (on_mix if teacher_on_mix else unmixed)]
            mix.task_fg = fg if teacher_on_mix else [mix.cut(f) for f in fg]
        return mix

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        """nnU-Net's step, written out here because its own lives inside nnUNetTrainer.train_step with the
        forward pass: gradient scaler, clipping at 12 (of the parameters nnU-Net's optimizer owns), then the
        task classifier's own optimizer if it has one (``recognition_lr``)."""
        rec_opt = self.recognition_optimizer
        clipped = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(clipped, 12)
            self.grad_scaler.step(self.optimizer)
            if rec_opt is not None:
                self.grad_scaler.step(rec_opt)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clipped, 12)
            self.optimizer.step()
            if rec_opt is not None:
                rec_opt.step()
        self.global_step += 1

    def _sync_buffers(self) -> None:
        for buffer in self._plain_network().buffers():
            dist.broadcast(buffer, src=0)

    def _gather(self, vals: np.ndarray) -> np.ndarray:
        if not self.is_ddp:
            return vals
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, vals)
        return np.concatenate(gathered)

    @override
    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        for key in epoch_log.STEP_KEYS:
            vals = self._gather(np.array([float(o[key]) for o in train_outputs]))
            value = float(np.nanmean(vals)) if np.any(np.isfinite(vals)) else float("nan")
            self.logger.log(f"versemi_{key}", value, self.current_epoch)
        self._warn_if_empty(self._gather(np.stack([o["task_fg"] for o in train_outputs])))

    def _warn_if_empty(self, task_fg: np.ndarray) -> None:
        """Stage 2 with an empty P_agg for ``empty_warning_epochs`` epochs in a row: say which task heads
        predict no foreground on the unlabeled images."""
        if not np.any(np.isfinite(task_fg)):
            return
        empty = ~(np.nan_to_num(task_fg, nan=0.0) > 0).any(axis=0)  # per task: no foreground all epoch
        kept = self.logger.get_value("versemi_unsup_kept", step=-1)
        self._empty_epochs = self._empty_epochs + 1 if (kept == 0 or empty.all()) else 0
        if self._empty_epochs >= self.config.empty_warning_epochs:
            names = [t.name for t, e in zip(self.task_table.tasks, empty) if e] or ["(none fully empty)"]
            self.print_to_log_file(
                f"WARNING: P_agg has been (almost) empty for {self._empty_epochs} epochs: L_unsup kept "
                f"{kept:.0%} of the unlabeled samples this epoch. Task heads with no foreground on the unlabeled "
                f"images: {', '.join(names)}. The unlabeled term teaches nothing until they predict foreground; "
                f"train longer before the switch (switch_dice, stage1_min_fraction) or check these tasks' labels.")

    # -------------------------------------------------------------------------------------- validation
    @override
    def validation_step(self, batch: dict) -> dict:
        labeled, target = self._to_device(batch)
        tasks = labeled.tasks
        with self._autocast():
            outs, task_logits = self.network(labeled.x, labeled.prompts, recognition=True)
            loss = self.terms.supervised(outs, labeled)
        T = self.task_table.num_tasks
        correct = torch.bincount(tasks[task_logits.argmax(1) == tasks], minlength=T)
        logits = mixes.LabeledBatch.own_prompt(outs)[0]
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
        self.logger.log(f"versemi_{epoch_log.REC_KEY}", acc, self.current_epoch)
        self.print_to_log_file("Task recognition accuracy per task (validation patches)",
                               {t.name: round(a, 4) for t, a in zip(self.task_table.tasks, acc)})

    @override
    def on_epoch_start(self):
        super().on_epoch_start()
        n = self.schedule.sup_finish_epochs(self.num_epochs)
        if n and self.current_epoch == self.num_epochs - n:
            self.print_to_log_file(f"VerSemi: closing phase from epoch {self.current_epoch} (the last {n} of "
                                   f"{self.num_epochs} epochs, sup_finish_fraction={self.config.sup_finish_fraction}): "
                                   "L_sup alone on the unmixed labeled images, every CutMix term off")

    @override
    def on_train_end(self):
        if self.local_rank == 0:
            self.warn_unlearned_tasks()
        super().on_train_end()

    @override
    def on_epoch_end(self):
        # before nnU-Net's checkpointing in super(), so a checkpoint written now already holds the switch
        self.maybe_switch()
        super().on_epoch_end()
        if self.local_rank == 0:
            from nnunetv2_versemi.training.plotting import plot_versemi_progress

            plot_versemi_progress(self.logger.get_checkpoint(), self.task_table,
                                  join(self.output_folder, "progress_versemi.png"))

    # ------------------------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus a ``versemi`` entry (with the effective config), written to a temporary file
        and renamed into place, so a run killed mid-write leaves the previous checkpoint intact for ``--c``."""
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
                "config": self.config.to_dict(),
                "ema_weights": self.teacher.state_dict() if self.teacher is not None else None,
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
        with logged_checkpoint_notices(self.print_to_log_file):
            super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else torch.load(
            filename_or_checkpoint, map_location=self.device, weights_only=False)
        for opt in (self.optimizer, self.recognition_optimizer):
            if opt is not None and drop_mismatched_optimizer_state(opt):
                self.print_to_log_file("The optimizer state of the converted task classifier starts afresh")
        state = checkpoint.get("versemi")
        if state is None:
            return
        if not TaskTable.from_dict(state["task_table"]).same_structure(self.task_table):
            raise TaskTableError("The checkpoint was trained on other tasks than the plans describe")
        if state.get("config") is not None and VerSemiConfig.from_dict(state["config"]) != self.config:
            self.print_to_log_file("WARNING: the checkpoint was trained with another VerSemi config; training goes "
                                   "on with this trainer's. Changes of the checkpoint's from this one: "
                                   f"{VerSemiConfig.from_dict(state['config']).changes(self.config)}")
        self.global_step = state["global_step"]
        self.switch_epoch = state.get("switch_epoch")
        # checkpoints of earlier versions lack some per-epoch keys: pad them, nnU-Net's logger needs one per epoch
        epoch_log.add_keys(self.logger, self.task_table.num_tasks, epochs=self.current_epoch)
        if self.teacher is not None:
            # a checkpoint without a teacher (trained with another target_source): the teacher starts as the
            # loaded student, not as the initial weights it was copied from
            ema = state.get("ema_weights")
            with logged_checkpoint_notices(self.print_to_log_file):
                self.teacher.load_state_dict(ema if ema is not None else self._plain_network().state_dict())
        if self.recognition_optimizer is not None and state.get("recognition_optimizer") is not None:
            self.recognition_optimizer.load_state_dict(state["recognition_optimizer"])
