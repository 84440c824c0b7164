"""The predictor's input checks, before any model is loaded: case files, channels, image headers."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_versemi.inference.predict import (
    PredictionError,
    list_auto_cases,
    list_cases,
    task_input_channels,
)
from nnunetv2_versemi.tasktable import Task, TaskLabel, TaskTable


def _write(path, arr=None, vector=False):
    arr = np.random.default_rng(0).normal(size=(4, 6, 6)).astype(np.float32) if arr is None else arr
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=vector), str(path))


def _table() -> TaskTable:
    return TaskTable(tasks=[
        Task(name="CT", source_dataset="Dataset901_CT", channel_names={"0": "CT"},
             labels=[TaskLabel("organ", 1, 1)], labeled=["CT_a"]),
        Task(name="Pro", source_dataset="Dataset902_Pro", channel_names={"0": "T2", "1": "ADC"},
             labels=[TaskLabel("gland", 1, 2)], channel=1, labeled=["Pro_a"]),
    ])


def test_cases_grouped_with_their_channels(tmp_path):
    for c in ("a", "b"):
        for k in range(2):
            _write(tmp_path / f"{c}_{k:04d}.nii.gz")
    cases = list_cases(str(tmp_path), ".nii.gz", 2)
    assert sorted(cases) == ["a", "b"] and [f[-12:] for f in cases["a"]] == ["_0000.nii.gz", "_0001.nii.gz"]


def test_ill_lone_second_channel_file(tmp_path):
    _write(tmp_path / "case_0001.nii.gz")
    with pytest.raises(PredictionError, match=r"Case case .* has channel files \['_0001'\].*from _0000"):
        list_cases(str(tmp_path), ".nii.gz", 1)


def test_ill_vector_image(tmp_path):
    _write(tmp_path / "case_0000.nii.gz", np.zeros((4, 6, 6, 3), np.float32), vector=True)
    with pytest.raises(PredictionError, match=r"Case case: .*case_0000.nii.gz is a 3-d image with 3 component"):
        list_cases(str(tmp_path), ".nii.gz", 1)


def test_ill_4d_image(tmp_path):
    vol = sitk.GetImageFromArray(np.zeros((4, 6, 6), np.float32))
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(tmp_path / "case_0000.nii.gz"))
    with pytest.raises(PredictionError, match=r"is a 4-d image with 1 component"):
        list_cases(str(tmp_path), ".nii.gz", 1)


def test_channel_task_reads_all_source_channels(tmp_path):
    """A task merged with --channel 1 of a 2-channel source takes the source's two files per case (the
    predictor picks channel 1), not one."""
    table = _table()
    assert task_input_channels(table.tasks[1]) == 2
    for k in range(2):
        _write(tmp_path / f"p_{k:04d}.nii.gz")
    _write(tmp_path / "c_0000.nii.gz")
    found = list_auto_cases(str(tmp_path), table)
    assert found["p"][1] == [1] and found["c"][1] == [0]


def test_ill_auto_case_fitting_no_task(tmp_path):
    for k in range(3):
        _write(tmp_path / f"x_{k:04d}.nii.gz")
    with pytest.raises(PredictionError, match=r"Case x \(3 channel file\(s\), .nii.gz\) fits no task.*CT: 1 x"):
        list_auto_cases(str(tmp_path), _table())
