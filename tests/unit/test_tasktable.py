"""The label lookup tables of the task table: one home for merged <-> local <-> source values."""

from __future__ import annotations

import numpy as np

from nnunetv2_versemi.tasktable import Task, TaskLabel, TaskTable


def _table() -> TaskTable:
    liver = Task("Liver", "Dataset501_Liver", {"0": "CT"}, [TaskLabel("liver", 1, 1)])
    kidney = Task("Kidney", "Dataset502_Kidney", {"0": "CT"}, [TaskLabel("kidney", 2, 2), TaskLabel("tumour", 5, 3)])
    return TaskTable([liver, kidney])


def test_lookup_tables_round_trip():
    table = _table()
    kidney = table.tasks[1]
    assert table.merged_to_local_lut().tolist() == [0, 1, 1, 2]
    assert table.local_to_merged_lut().tolist() == [[0, 1, 0], [0, 2, 3]]
    assert kidney.merged_to_source_lut().tolist() == [0, 0, 2, 5]
    assert kidney.source_to_merged_lut().tolist() == [0, 0, 2, 0, 0, 3]
    assert kidney.source_to_merged_lut(8).shape == (8,)
    assert kidney.merged_to_local_lut(table.num_merged_labels).tolist() == [0, 0, 1, 2]
    # source -> merged -> source is the identity on the task's values; merged -> local -> merged too
    src = np.array(kidney.source_values)
    assert kidney.merged_to_source_lut()[kidney.source_to_merged_lut()[src]].tolist() == src.tolist()
    merged = np.arange(1, table.num_merged_labels)
    local = table.merged_to_local_lut()[merged]
    owner = np.array([0, 1, 1])
    assert table.local_to_merged_lut()[owner, local].tolist() == merged.tolist()


def test_benchmark_curves_average_each_tasks_classes_per_epoch():
    from nnunetv2_versemi.benchmark.report import _per_task_dice

    # merged classes: 1 liver, 2 kidney, 3 tumour; epoch 2 saw no kidney class (NaN)
    per_class = [[0.5, 0.2, 0.6], [0.7, float("nan"), float("nan")], [0.9, float("nan"), 0.4]]
    got = _per_task_dice(_table(), per_class)
    assert got["Liver"] == [0.5, 0.7, 0.9]
    assert got["Kidney"][0] == 0.4 and got["Kidney"][1] is None and got["Kidney"][2] == 0.4
