"""VerSemi trainers built in memory for the unit layer: plans, dataset.json and task table made here, nothing
merged, planned or preprocessed."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_versemi.benchmark.speed import synthetic_plans
from nnunetv2_versemi.data.preprocess import unlabeled_folder
from nnunetv2_versemi.tasktable import TABLE_KEY, Task, TaskLabel, TaskTable

CONFIGURATION = "2d"


def tiny_table() -> TaskTable:
    """Three tasks, the second with two classes (merged labels 1 | 2, 3 | 4), two labeled and two unlabeled
    cases each."""
    tasks, merged = [], 1
    for i, (name, classes) in enumerate((("Liver", ["liver"]), ("Kidney", ["kidney", "tumour"]),
                                         ("Heart", ["atrium"]))):
        tasks.append(Task(name, f"Dataset{501 + i}_{name}", {"0": "noNorm"},
                          [TaskLabel(c, k + 1, merged + k) for k, c in enumerate(classes)],
                          labeled=[f"{name}_l{j}" for j in range(2)], unlabeled=[f"{name}_u{j}" for j in range(2)]))
        merged += len(classes)
    return TaskTable(tasks)


def tiny_plans(table: TaskTable) -> dict:
    """nnU-Net plans of one 2d configuration: 32x32 patches, batch 4, a PlainConvUNet of 3 stages (4, 8, 16
    features, one conv per stage), the task table attached as planning attaches it."""
    plans, configuration = synthetic_plans((32, 32), batch_size=4, base_features=4)
    assert configuration == CONFIGURATION
    arch = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
    n = 3
    arch.update(n_stages=n, features_per_stage=arch["features_per_stage"][:n], kernel_sizes=arch["kernel_sizes"][:n],
                strides=arch["strides"][:n], n_conv_per_stage=[1] * n, n_conv_per_stage_decoder=[1] * (n - 1))
    plans[TABLE_KEY] = table.to_dict()
    plans["continue_training"] = False  # nnU-Net's trainer pops it (get_trainer_from_args sets it)
    return plans


def tiny_dataset_json(table: TaskTable) -> dict:
    """The union's dataset.json as the merge writes it: one unnormalized channel, the merged labels, the table."""
    return {"channel_names": {"0": "noNorm"}, "labels": table.merged_label_dict(),
            "numTraining": sum(len(t.labeled) for t in table.tasks), "file_ending": ".nii.gz",
            TABLE_KEY: table.to_dict()}


@pytest.fixture
def make_trainer(tmp_path, monkeypatch):
    """``make_trainer(cls)``: an initialized trainer of class ``cls`` (VerSemiTrainer or a variant) on the tiny
    plans, on the CPU, seeded; its log and output folder in ``tmp_path``."""
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(v, str(tmp_path / v))
    monkeypatch.setenv("nnUNet_compile", "false")
    table = tiny_table()
    plans, dataset_json = tiny_plans(table), tiny_dataset_json(table)
    # initialize() reads no image: it infers nnU-Net's dataset class from the file endings in the preprocessed
    # folder and checks that every unlabeled case of the table has a file; empty files answer both
    base = tmp_path / "nnUNet_preprocessed" / plans["dataset_name"]
    data_identifier = plans["configurations"][CONFIGURATION]["data_identifier"]
    for folder, cases in ((base / data_identifier, [c for t in table.tasks for c in t.labeled]),
                          (Path(unlabeled_folder(str(base), data_identifier)),
                           [c for t in table.tasks for c in t.unlabeled])):
        folder.mkdir(parents=True)
        for case in cases:
            (folder / f"{case}.b2nd").touch()

    def make(cls):
        torch.manual_seed(0)
        np.random.seed(0)
        trainer = cls(copy.deepcopy(plans), CONFIGURATION, 0, dataset_json, device=torch.device("cpu"))
        trainer.initialize()
        return trainer

    return make
