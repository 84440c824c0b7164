"""Few labeled cases per task: every fold of a union's split trains, validating each task on something.

Unions with 1, 2 and 3 labeled cases per task (demo tasks at half resolution, 2d). Every fold 0-4 and 'all' is
set up the way nnUNetv2_train sets it up (split, datasets); one stock nnUNetv2_train run covers the smallest
case end to end, where nnU-Net's split leaves fold 0 without any validation case.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from nnunetv2_versemi.data import merge as M
from nnunetv2_versemi.data.demo_data import generate_demo_datasets
from nnunetv2_versemi.data.splits import complete_validation, describe_splits, make_stratified_splits
from nnunetv2_versemi.discovery import ext_trainer_dir
from nnunetv2_versemi.entrypoints.data import plan_and_preprocess_main
from nnunetv2_versemi.tasktable import TaskTable

import _synth as S  # tests/ is on sys.path (pyproject.toml: pytest's pythonpath)

FOLDS = [0, 1, 2, 3, 4, "all"]


@pytest.fixture(scope="module")
def unions(tmp_path_factory):
    base = tmp_path_factory.mktemp("few")
    mp = pytest.MonkeyPatch()
    S.isolated_nnunet(base, mp)
    mp.setenv("nnUNet_n_proc_DA", "1")
    mp.setenv("nnUNet_extTrainer", ext_trainer_dir())
    generate_demo_datasets(base / "nnUNet_raw", num_labeled=4, num_unlabeled=1, num_test=0, scale=0.5)
    ids = {}
    for k in (1, 2, 3):
        ids[k] = 960 + k
        M.merge_datasets([901, 902, 903], ids[k], f"Few{k}", labeled_cases=k, num_processes=1, progress=False)
        plan_and_preprocess_main(["-d", str(ids[k]), "-c", "2d", "-np", "1", "-npfp", "1", "--no_pbar"])
    yield {"base": base, "ids": ids}
    mp.undo()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_fold_trains_every_task_and_validates_every_task(unions, k):
    from nnunetv2.run.run_training import get_trainer_from_args

    for fold in FOLDS:
        trainer = get_trainer_from_args(str(unions["ids"][k]), "2d", fold, "VerSemiTrainer_tiny", "nnUNetPlans",
                                        device=torch.device("cpu"))
        tr, val = trainer.do_split()
        table = trainer.task_table
        tasks_tr = {table.task_of_case(c) for c in tr}
        tasks_val = {table.task_of_case(c) for c in val}
        assert tasks_tr == tasks_val == set(range(table.num_tasks)), (k, fold)
        # a single labeled case cannot be held out: that task (here: all) validates on its training case
        expected = [t.name for t in table.tasks] if k == 1 and fold != "all" else []
        assert trainer.validation_fallback == expected, (k, fold)
        if expected:
            assert "validated on their training cases" in open(trainer.log_file).read()


def test_split_description_and_fallback_helper(unions):
    table = TaskTable.from_dataset_json(json.loads(
        (unions["base"] / "nnUNet_raw" / "Dataset961_Few1" / "dataset.json").read_text()))
    lines = describe_splits(make_stratified_splits(table), table)
    assert lines[0].startswith("DemoCT: 1 labeled case, validated in no fold")
    table3 = TaskTable.from_dataset_json(json.loads(
        (unions["base"] / "nnUNet_raw" / "Dataset963_Few3" / "dataset.json").read_text()))
    assert "validated in every fold" in describe_splits(make_stratified_splits(table3), table3)[1]
    ct = table3.tasks[0].labeled
    val, fallback = complete_validation(ct + table3.tasks[1].labeled, table3.tasks[1].labeled[:1], table3)
    assert fallback == ["DemoCT"] and set(ct) <= set(val)


def test_stock_training_with_one_labeled_case_per_task(unions):
    """The reported crash: fold 0 of a union with 1 labeled case per task (no validation case at all)."""
    env = dict(os.environ)
    res = subprocess.run(["nnUNetv2_train", str(unions["ids"][1]), "2d", "0", "-tr", "VerSemiTrainer_tiny",
                          "-device", "cpu"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "background workers are no longer alive" not in res.stdout + res.stderr
    fold = (unions["base"] / "nnUNet_results" / "Dataset961_Few1" / "VerSemiTrainer_tiny__nnUNetPlans__2d"
            / "fold_0")
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert summary["versemi_validation_fallback"]["tasks"] == ["DemoCT", "DemoMR", "DemoMC"]
    assert all(v["n_cases"] == 1 for v in summary["versemi_per_task"].values())


def test_benchmark_refuses_folds_plain_nnunet_cannot_train(unions, tmp_path, capsys):
    from nnunetv2_versemi.entrypoints.benchmark import benchmark_main

    out = tmp_path / "report"
    with pytest.raises(SystemExit):
        benchmark_main(["-d", str(unions["ids"][1]), "-c", "2d", "--methods", "b", "--folds", "0", "-device", "cpu",
                "-o", str(out)])
    err = capsys.readouterr().err
    assert "Fold(s) [0]" in err and "Use --folds all" in err
    assert not out.exists()
