"""The data side of a VerSemi trainer: every task validated in each fold, task-balanced labeled batches, and the
unlabeled pool (each DDP rank its own shard) behind nnU-Net's augmentation."""

from __future__ import annotations

from os.path import isdir, join

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch import distributed as dist
from typing_extensions import override

from nnunetv2_versemi.data.preprocess import missing_unlabeled, unlabeled_folder
from nnunetv2_versemi.data.splits import complete_validation
from nnunetv2_versemi.tasktable import TABLE_KEY, table_with_counts
from nnunetv2_versemi.training.ddp import split_global_batch
from nnunetv2_versemi.training.sampling import TaskBalancedDataLoader


class TaskData:
    """Mixin of :class:`~nnunetv2_versemi.training.trainer.VerSemiTrainer` (before nnUNetTrainer in its bases): its
    split, data loaders and unlabeled pool. Reads the trainer's ``task_table``, ``config`` and ``uses_unlabeled``."""

    dataloader_unlabeled = None

    def _check_unlabeled_images(self) -> None:
        """The unlabeled images the loss terms need are preprocessed, all of them (or, with
        ``allow_labeled_only``, training goes on labeled-only, logged)."""
        if self.uses_unlabeled and not self._unlabeled_cases():
            if not self.config.allow_labeled_only:
                raise FileNotFoundError(
                    f"No preprocessed unlabeled images in {self._unlabeled_dir()}. Run "
                    f"nnUNetv2_versemi_plan_and_preprocess -d {self.plans_manager.dataset_name} -c "
                    f"{self.configuration_name}, or train {self.__class__.__name__}_noUnsup (labeled only)."
                )
            self.print_to_log_file("WARNING: no unlabeled images; training labeled-only as allowed by "
                                   "allow_labeled_only")
            self.uses_unlabeled = False
        if self.uses_unlabeled:
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

    @override
    def print_plans(self):
        """nnU-Net's print of the plans, with the task table's case lists as counts: a pool of 10,000 unlabeled
        images would otherwise add 200 kB to every training log."""
        pm = self.plans_manager
        full = pm.plans
        if TABLE_KEY in full:
            pm.plans = {**full, TABLE_KEY: table_with_counts(full[TABLE_KEY])}
        try:
            super().print_plans()
        finally:
            pm.plans = full

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
                                       transforms=tr_transforms, balance=self.config.labeled_balance,
                                       forced_per_task=self.config.task_batches, **common)
        # validation batches are task balanced too, so every task gets an online pseudo Dice
        dl_val = TaskBalancedDataLoader(dataset_val, self.batch_size, cm.patch_size, cm.patch_size, lm,
                                        transforms=val_transforms, balance="tasks", pair_different_tasks=False,
                                        **common)
        mt_train, mt_val = self._augmenter(dl_tr, True), self._augmenter(dl_val, False)
        if self.uses_unlabeled:
            # nnU-Net's spatial and intensity augmentation; nothing that needs a segmentation
            u_transforms = self.get_training_transforms(
                cm.patch_size, rotation, None, mirror_axes, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
                is_cascaded=False, foreground_labels=lm.foreground_labels, regions=None, ignore_label=None)
            folder = self._unlabeled_dir()
            world, rank = (dist.get_world_size(), dist.get_rank()) if self.is_ddp else (1, 0)
            dataset_class = infer_dataset_class(folder)
            shard = self._unlabeled_shard(dataset_class.get_identifiers(folder), world, rank)
            dataset_u = dataset_class(folder, shard)
            global_u = self.unlabeled_global_batch()
            dl_u = nnUNetDataLoader(dataset_u, split_global_batch(global_u, world, rank), initial_patch_size,
                                    cm.patch_size, lm, oversample_foreground_percent=0.0, transforms=u_transforms)
            self.dataloader_unlabeled = self._augmenter(dl_u, True)
            _ = next(self.dataloader_unlabeled)
        _ = next(mt_train)
        _ = next(mt_val)
        return mt_train, mt_val

    def unlabeled_global_batch(self) -> int:
        """Unlabeled images per step over every rank: ``unlabeled_batch_size``, else as many as the labeled batch
        holds (the planned batch, one per task with ``task_batches``)."""
        return self.config.unlabeled_batch_size or self.configuration_manager.batch_size * self.batches_per_step()

    @staticmethod
    def _unlabeled_shard(identifiers: list[str], world: int, rank: int) -> list[str]:
        """This rank's share of the unlabeled pool: every world-th case of the sorted pool, so ranks never draw
        the same unlabeled image in a step, whatever their random states (the whole pool when it has fewer
        cases than ranks)."""
        identifiers = sorted(identifiers)
        return identifiers[rank::world] if len(identifiers) >= world else identifiers

    @override
    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()
        self.dataloader_unlabeled = None
