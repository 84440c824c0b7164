"""Task-aware sampling of labeled cases for VerSemi batches."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

BALANCE_MODES = ("tasks", "cases")


def draw_batch_tasks(num_tasks: int, batch_size: int, rng: np.random.RandomState,
                     available: list[int] | None = None, pair_different_tasks: bool = True) -> list[int]:
    """Task of every batch slot, each task as often as possible (counts differ by at most one).

    With ``pair_different_tasks`` slot i and slot i + batch_size // 2 (the CutMix pairs of the trainer) get
    different tasks whenever more than one task is available.
    """
    tasks = list(range(num_tasks)) if available is None else list(available)
    if not tasks:
        raise ValueError("No task has labeled cases to sample from")
    half = batch_size // 2
    if not pair_different_tasks or len(tasks) < 2 or half == 0:
        cycle = [tasks[i] for i in rng.permutation(len(tasks))]
        return [cycle[i % len(cycle)] for i in range(batch_size)]
    # first half: balanced cycle; second half: the same cycle shifted by a random non-zero offset, so
    # counts stay balanced and every pair crosses tasks
    order = [tasks[i] for i in rng.permutation(len(tasks))]
    first = [order[i % len(order)] for i in range(half)]
    offset = rng.randint(1, len(order))
    second = [order[(i + offset) % len(order)] for i in range(half)]
    rest = [order[(half + i) % len(order)] for i in range(batch_size - 2 * half)]
    return first + second + rest


class TaskBalancedDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader with VerSemi's labeled sampling.

    ``balance="tasks"``: every task fills the same share of each batch (small datasets are not drowned by
    large ones); ``balance="cases"``: cases are drawn uniformly, so tasks appear in proportion to their case
    counts (nnU-Net's own behaviour). Cropping and augmentation are nnU-Net's; foreground oversampling keeps
    nnU-Net's number of forced slots per batch but draws their positions anew for every batch, so both sides
    of every CutMix pair (slot i, slot i + B/2) get them; ``forced_per_task`` draws them within each task's slots,
    nnU-Net's number for a batch of that task's size (the trainer's ``task_batches``).
    """

    def __init__(self, *args, case_tasks: Mapping[str, int], num_tasks: int, balance: str = "tasks",
                 pair_different_tasks: bool = True, forced_per_task: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {BALANCE_MODES}, got {balance!r}")
        if forced_per_task and balance != "tasks":
            raise ValueError("forced_per_task needs balance='tasks'")
        self.forced_per_task = forced_per_task
        missing = [k for k in self.indices if k not in case_tasks]
        if missing:
            raise ValueError(f"Cases without a task: {missing[:5]}")
        self.balance = balance
        self.pair_different_tasks = pair_different_tasks
        self.num_tasks = num_tasks
        self.cases_per_task: dict[int, list[str]] = {}
        for k in self.indices:
            self.cases_per_task.setdefault(int(case_tasks[k]), []).append(k)
        if self.get_do_oversample == self._oversample_last_XX_percent:
            # nnU-Net forces foreground into the LAST round(B * p) slots; the trainer pairs slot i with slot
            # i + B/2 for CutMix, so the first half would never get a forced foreground patch. Same count of
            # forced slots per batch (nnU-Net's rate), at positions drawn anew for every batch.
            self.get_do_oversample = self._oversample_random_slots
        self._forced_slots: set[int] = set()

    def num_forced_slots(self, slots: int | None = None) -> int:
        """Slots with forced foreground among ``slots`` (default: the batch), as nnU-Net's
        ``_oversample_last_XX_percent`` counts them in a batch of that size."""
        n = self.batch_size if slots is None else slots
        return n - round(n * (1 - self.oversample_foreground_percent))

    def draw_forced_slots(self, rng=np.random) -> set[int]:
        return {int(i) for i in rng.choice(self.batch_size, self.num_forced_slots(), replace=False)}

    def draw_forced_slots_per_task(self, slot_tasks: list[int], rng=np.random) -> set[int]:
        """Forced slots drawn within each task's slots, as many as nnU-Net forces in a batch of that task alone."""
        forced: set[int] = set()
        for t in sorted(set(slot_tasks)):
            mine = [i for i, s in enumerate(slot_tasks) if s == t]
            forced.update(int(i) for i in rng.choice(mine, self.num_forced_slots(len(mine)), replace=False))
        return forced

    def _oversample_random_slots(self, sample_idx: int) -> bool:
        return sample_idx in self._forced_slots

    def generate_train_batch(self):
        if not self.forced_per_task:  # per task: get_indices draws them with the batch's tasks
            self._forced_slots = self.draw_forced_slots()
        return super().generate_train_batch()

    def get_indices(self):
        if self.balance == "cases":
            return super().get_indices()
        slots = draw_batch_tasks(self.num_tasks, self.batch_size, np.random,
                                 sorted(self.cases_per_task), self.pair_different_tasks)
        if self.forced_per_task and self.get_do_oversample == self._oversample_random_slots:
            self._forced_slots = self.draw_forced_slots_per_task(slots)
        return [self.cases_per_task[t][np.random.randint(len(self.cases_per_task[t]))] for t in slots]
