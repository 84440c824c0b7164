"""Final validation of a VerSemi model: nnU-Net's own, on what stock ``nnUNetv2_predict`` writes (the prompt-free
network, each patch routed to the task it is recognised as), plus each case under its own task's prompt, the
per-task means and the task recognition report in summary.json."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from os.path import isdir, isfile, join

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import distributed as dist
from typing_extensions import override

from nnunetv2_versemi.inference.prompted import PromptPerCase
from nnunetv2_versemi.tasktable import TaskTable


class FinalValidation:
    """Mixin of :class:`~nnunetv2_versemi.training.trainer.VerSemiTrainer` (before nnUNetTrainer in its bases): the
    trainer's final validation. Reads the trainer's ``task_table``, ``config``, ``validation_fallback`` and
    ``_plain_network()``."""

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
        prompted = self._validate_prompted(base) if self.config.validate_prompted_too else None
        marks: list[tuple[str, int]] = []  # (case, its first entry in ``seen``), in the order nnU-Net predicts
        with net.recording_task_probabilities() as seen, \
                dataset_hook(self, base, lambda case: marks.append((case, len(seen)))):
            super().perform_actual_validation(save_probabilities)
        ends = [start for _, start in marks[1:]] + [len(seen)]
        probs = {case: [p.cpu().numpy() for p in seen[start:end]] for (case, start), end in zip(marks, ends)}
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
        with PromptPerCase(net) as switch, dataset_hook(self, base, lambda case: switch(table.task_of_case(case))):
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
            if mean[t] < self.config.recognition_threshold:
                self.print_to_log_file(f"WARNING: case {case}: no task recognised with probability >= "
                                       f"{self.config.recognition_threshold} (best: {table.tasks[t].name}, {mean[t]:.2f})")
        accuracy = {}
        for task in table.tasks:
            own = [c for c in cases.values() if c["task"] == task.name]
            accuracy[task.name] = float(np.mean([c["recognised"] == task.name for c in own])) if own else None
        return {"routing": "recognised", "accuracy_per_task": accuracy, "cases": cases}


@contextlib.contextmanager
def dataset_hook(trainer: nnUNetTrainer, base: type, on_load: Callable[[str], None]):
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
