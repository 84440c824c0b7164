"""nnUNetv2_versemi_plan_and_preprocess and the task-stratified splits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nnunetv2_versemi.data import merge as M
from nnunetv2_versemi.data import preprocess as P
from nnunetv2_versemi.data.splits import make_stratified_splits, splits_match_table
from nnunetv2_versemi.entrypoints.data import plan_and_preprocess_main
from nnunetv2_versemi.tasktable import Task, TaskLabel, TaskTable

import _synth as S  # tests/ is on sys.path (pyproject.toml: pytest's pythonpath)


def _table(sizes: dict[str, int], unlabeled: int = 2) -> TaskTable:
    tasks = []
    for i, (name, n) in enumerate(sizes.items()):
        tasks.append(
            Task(
                name=name,
                source_dataset=f"Dataset{i:03d}_{name}",
                channel_names={"0": "CT"},
                labels=[TaskLabel("fg", 1, i + 1)],
                labeled=[f"{name}_{k:03d}" for k in range(n)],
                unlabeled=[f"{name}_u{k}" for k in range(unlabeled)],
                test=[f"{name}_t0"],
            )
        )
    return TaskTable(tasks)


def test_splits_stratified_by_task():
    table = _table({"Big": 12, "Five": 5, "Three": 3, "Two": 2, "One": 1})
    splits = make_stratified_splits(table, n_splits=5, seed=12345)
    labeled = sorted(c for t in table.tasks for c in t.labeled)
    assert len(splits) == 5 and splits_match_table(splits, table)
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
        assert sorted(s["train"] + s["val"]) == labeled  # no unlabeled or test case anywhere
        for t in table.tasks:
            n_val = len(set(s["val"]) & set(t.labeled))
            n_train = len(set(s["train"]) & set(t.labeled))
            assert n_train >= 1  # every task is trained on in every fold
            if len(t.labeled) >= 2:
                assert n_val >= 1, f"fold validates on no {t.name} case"
            else:
                assert n_val == 0
    for t in ("Big", "Five"):  # large enough: the validation sets partition the task
        vals = [c for s in splits for c in s["val"] if c.startswith(t + "_")]
        assert sorted(vals) == sorted(table.tasks[table.index(t)].labeled)
    sizes = [len(s["val"]) for s in splits]
    assert max(sizes) - min(sizes) <= 1
    assert make_stratified_splits(table, seed=12345) == splits
    assert make_stratified_splits(table, seed=1) != splits
    with pytest.raises(ValueError):
        make_stratified_splits(table, n_splits=1)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Three tiny tasks merged (half the labels dropped) and run through the whole command, 2d only."""
    base = tmp_path_factory.mktemp("pp")
    mp = pytest.MonkeyPatch()
    S.isolated_nnunet(base, mp)
    raw = str(base / "nnUNet_raw")
    S.make_three(raw)
    M.merge_datasets([501, 502, 503], 600, labeled_fraction=0.5, num_processes=1, progress=False)
    plan_and_preprocess_main(["-d", "600", "-c", "2d", "-np", "1", "-npfp", "1", "--no_pbar"])
    pp = str(base / "nnUNet_preprocessed" / "Dataset600_VerSemiUnion")
    with open(os.path.join(raw, "Dataset600_VerSemiUnion", "dataset.json")) as f:
        table = TaskTable.from_dataset_json(json.load(f))
    yield {"raw": raw, "pp": pp, "table": table, "base": base}
    mp.undo()


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_plans_hold_the_task_table_and_splits_are_stratified(planned):
    table, pp = planned["table"], planned["pp"]
    plans = _load(os.path.join(pp, "nnUNetPlans.json"))
    assert plans["versemi"] == table.to_dict()
    assert TaskTable.from_plans(plans).same_structure(table)
    assert _load(os.path.join(pp, "splits_final.json")) == make_stratified_splits(table)
    assert _load(os.path.join(pp, "dataset.json"))["versemi"] == table.to_dict()
    # stock preprocessing saw only the labeled cases
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    labeled = sorted(c for t in table.tasks for c in t.labeled)
    assert sorted(nnUNetDatasetBlosc2.get_identifiers(os.path.join(pp, "nnUNetPlans_2d"))) == labeled
    assert [len(t.labeled) for t in table.tasks] == [2, 2, 2]


def test_unlabeled_cases_preprocessed_like_labeled_ones(planned, tmp_path):
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import (
        comp_blosc2_params,
        infer_dataset_class,
        nnUNetDatasetBlosc2,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    table, pp, raw = planned["table"], planned["pp"], planned["raw"]
    folder = P.unlabeled_folder(pp, "nnUNetPlans_2d")
    assert folder == os.path.join(pp, "nnUNetPlans_2d_unlabeled")
    unlabeled = sorted(c for t in table.tasks for c in t.unlabeled)
    assert len(unlabeled) == 8
    assert infer_dataset_class(folder) is nnUNetDatasetBlosc2
    ds = nnUNetDatasetBlosc2(folder)
    assert sorted(ds.identifiers) == unlabeled
    assert P.missing_unlabeled(pp, "nnUNetPlans_2d", table) == []

    plans = _load(os.path.join(pp, "nnUNetPlans.json"))
    cm = PlansManager(plans).get_configuration("2d")
    data, seg, _, props = ds.load_case(unlabeled[0])
    assert data.dtype == np.float32 and data.shape[0] == 1
    assert seg.dtype == np.int8 and seg.shape == (1, *data.shape[1:]) and not np.any(seg[:])
    assert "class_locations" in props and "shape_before_cropping" in props
    assert tuple(data.chunks) == comp_blosc2_params(data.shape, tuple(cm.patch_size), 4)[1]

    # a labeled case run through the unlabeled path gives exactly nnU-Net's preprocessed data of that case
    case = table.tasks[0].labeled[0]
    files = [os.path.join(raw, "Dataset600_VerSemiUnion", "imagesTr", f"{case}_0000.nii.gz")]
    dj = _load(os.path.join(pp, "dataset.json"))
    P._preprocess_unlabeled_case((case, files, str(tmp_path / case), plans, "2d", dj))
    ours = blosc2.open(str(tmp_path / f"{case}.b2nd"))[:]
    stock = nnUNetDatasetBlosc2(os.path.join(pp, "nnUNetPlans_2d")).load_case(case)[0][:]
    np.testing.assert_array_equal(ours, stock)


def test_attach_only_and_unlabeled_only(planned, capsys):
    pp = planned["pp"]
    plans_file = os.path.join(pp, "nnUNetPlans.json")
    plans = _load(plans_file)
    del plans["versemi"]
    with open(plans_file, "w") as f:
        json.dump(plans, f)
    plan_and_preprocess_main(["-d", "Dataset600_VerSemiUnion", "--only-attach"])
    assert _load(plans_file)["versemi"] == planned["table"].to_dict()
    assert "kept" in capsys.readouterr().out  # the splits already matched

    folder = P.unlabeled_folder(pp, "nnUNetPlans_2d")
    victim = os.path.join(folder, planned["table"].tasks[0].unlabeled[0] + ".b2nd")
    os.remove(victim)
    assert P.missing_unlabeled(pp, "nnUNetPlans_2d", planned["table"]) == [
        planned["table"].tasks[0].unlabeled[0]
    ]
    plan_and_preprocess_main(["-d", "600", "-c", "2d", "3d_lowres", "-np", "1", "--only-unlabeled", "--no_pbar"])
    assert os.path.isfile(victim)
    assert not os.path.isdir(P.unlabeled_folder(pp, "nnUNetPlans_3d_lowres"))  # not planned, skipped


def test_ill_not_a_union(planned, capsys):
    with pytest.raises(SystemExit) as e:
        plan_and_preprocess_main(["-d", "501", "-c", "2d"])
    assert e.value.code == 2
    assert "no 'versemi' task table" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(str(planned["base"]), "nnUNet_preprocessed", "Dataset501_Liver"))


def test_each_tasks_own_spacing_against_the_unions_grid(planned, capsys):
    from nnunetv2_versemi.data.task_grid import (
        TaskGridError,
        describe_task_grids,
        report_task_grids,
        task_spacings,
    )

    table, pp = planned["table"], planned["pp"]
    name = "Dataset600_VerSemiUnion"
    plans = _load(os.path.join(pp, "nnUNetPlans.json"))
    union_2d = plans["configurations"]["2d"]["spacing"]
    fp_file = os.path.join(pp, "dataset_fingerprint.json")
    original = _load(fp_file)
    try:
        # all tasks share one spacing here: each task's own 2d spacing is the union's, and none is resampled
        same = task_spacings(name, plans, table)
        assert "2d" in same and sorted(same["2d"]) == sorted(t.name for t in table.tasks)
        assert all(np.allclose(s, union_2d) for s in same["2d"].values())
        assert not any("resampled" in line for line in describe_task_grids(plans, same))
        # the second task's cases at half the in-plane spacing: only its own spacing changes
        second = table.tasks[1]
        fp = json.loads(json.dumps(original))
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        cases = list(get_filenames_of_train_images_and_targets(
            os.path.join(planned["raw"], name), _load(os.path.join(planned["raw"], name, "dataset.json"))))
        for i, c in enumerate(cases):
            if table.task_of_case(c) == 1:
                fp["spacings"][i] = [fp["spacings"][i][0], fp["spacings"][i][1] / 2, fp["spacings"][i][2] / 2]
        with open(fp_file, "w") as f:
            json.dump(fp, f)
        got = task_spacings(name, plans, table)["2d"]
        assert np.allclose(got[second.name], np.asarray(same["2d"][second.name]) / 2)
        for t in (table.tasks[0], table.tasks[2]):
            assert np.allclose(got[t.name], same["2d"][t.name])
        lines = report_task_grids(name, plans, table)
        marked = [line for line in lines if line.startswith("  ") and "resampled" in line]
        assert len(marked) == 2  # in 2d and 3d_fullres, both into a coarser grid, and only the second task
        assert all(m.strip().startswith(second.name + ":") and "coarser grid" in m for m in marked)
        # a fingerprint of other cases is refused, and the report says so instead of guessing
        fp["spacings"] = fp["spacings"][:-1]
        with open(fp_file, "w") as f:
            json.dump(fp, f)
        with pytest.raises(TaskGridError, match="extract the fingerprint again"):
            task_spacings(name, plans, table)
        assert report_task_grids(name, plans, table)[0].startswith("WARNING: no per-task spacing report")
    finally:
        with open(fp_file, "w") as f:
            json.dump(original, f)
    P._describe_task_grids(name, pp, "nnUNetPlans", table)
    assert "Each task's own spacing against the union's grid" in capsys.readouterr().out
