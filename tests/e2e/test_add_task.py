"""nnUNetv2_versemi_add_task: the grown union, the warm start (old prompts unchanged right after loading), a
stock ``nnUNetv2_train -pretrained_weights`` run, prediction with the grown model, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from os.path import isfile, join

import numpy as np
import pytest
import torch

from nnunetv2_versemi.data import merge as M
from nnunetv2_versemi.discovery import ext_trainer_dir
from nnunetv2_versemi.entrypoints.add_task import add_task_main
from nnunetv2_versemi.entrypoints.data import plan_and_preprocess_main
from nnunetv2_versemi.tasktable import TaskTable

import _synth as S  # tests/ is on sys.path (pyproject.toml: pytest's pythonpath)
from e2e.test_end_to_end import _run

OLD, NEW = "Dataset600_VerSemiUnion", "Dataset610_Grown"
TRAINER = "VerSemiTrainer_tiny"


def _load(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """Liver + Atrium trained (stock nnUNetv2_train, 2d, fold 0), then Kidney (2 classes: more than any old
    task) added with add_task."""
    base = tmp_path_factory.mktemp("addtask")
    mp = pytest.MonkeyPatch()
    S.isolated_nnunet(base, mp)
    for k, v in dict(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_extTrainer=ext_trainer_dir(),
                     nnUNet_compile="false", OMP_NUM_THREADS="1").items():
        mp.setenv(k, v)
    env = dict(os.environ)
    raw = str(base / "nnUNet_raw")
    S.make_three(raw, n_train=(4, 4, 4), n_unlabeled=(2, 1, 2), n_test=(1, 1, 1))
    M.merge_datasets([501, 502], 600, num_processes=1, progress=False)
    plan_and_preprocess_main(["-d", "600", "-c", "2d", "-np", "1", "-npfp", "1", "--no_pbar"])
    _run(["nnUNetv2_train", "600", "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    old_raw_hash = S.tree_hash(join(raw, OLD))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        add_task_main(["-d", "600", "-c", "2d", "-tr", TRAINER, "-a", "503", "-o", "610", "-n", "Grown",
                       "--labeled-cases", "3", "-np", "1", "--no-pbar"])
    pre, res = base / "nnUNet_preprocessed", base / "nnUNet_results"
    yield {"base": base, "env": env, "raw": raw, "pre": str(pre), "res": str(res), "old_raw_hash": old_raw_hash,
           "model": join(res, OLD, f"{TRAINER}__nnUNetPlans__2d"),
           "warm": join(pre, NEW, "versemi_warm_start", f"{TRAINER}__nnUNetPlans__2d__fold_0.pth"),
           "printed": printed.getvalue()}
    mp.undo()


def test_prints_the_recommended_fine_tuning_command(grown):
    from nnunetv2_versemi.training.variants import VerSemiTrainer_addTask, VerSemiTrainer_supOnly

    assert (f"nnUNetv2_train {NEW} 2d 0 -tr VerSemiTrainer_addTask -p nnUNetPlans -pretrained_weights "
            f"{grown['warm']}") in grown["printed"]
    # the trainer the command names: L_sup alone (the config the add-task benchmark measured), 250 epochs
    assert VerSemiTrainer_addTask.config == VerSemiTrainer_supOnly.config and VerSemiTrainer_addTask.epochs == 250


def test_grown_union_appends_the_task_and_keeps_old_cases_and_folds(grown):
    raw, pre = grown["raw"], grown["pre"]
    old = TaskTable.from_dataset_json(_load(join(raw, OLD, "dataset.json")))
    new = TaskTable.from_dataset_json(_load(join(raw, NEW, "dataset.json")))
    assert new.names == ["Liver", "Atrium", "Kidney"]
    assert new.to_dict()["tasks"][:2] == old.to_dict()["tasks"]  # old prompts, labels and case lists unchanged
    kidney = new.tasks[2]
    assert [lab.merged for lab in kidney.labels] == [3, 4] and len(kidney.labeled) == 3
    assert len(kidney.unlabeled) == 1 + 2 and len(kidney.test) == 1  # one label dropped + its imagesUnlabeled
    assert S.tree_hash(join(raw, OLD)) == grown["old_raw_hash"]  # the old union is only read
    new_hash = S.tree_hash(join(raw, NEW))
    for rel, h in grown["old_raw_hash"].items():
        if rel.split(os.sep)[0] in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
            assert new_hash[rel] == h, rel
    assert S.read(join(raw, NEW, "labelsTr", kidney.labeled[0] + ".nii.gz")).max() == 4
    old_splits, new_splits = _load(join(pre, OLD, "splits_final.json")), _load(join(pre, NEW, "splits_final.json"))
    assert len(new_splits) == len(old_splits)
    for o, n in zip(old_splits, new_splits):
        for key in ("train", "val"):
            assert [c for c in n[key] if not c.startswith("Kidney_")] == o[key]
    # 3 labeled cases for 5 folds: each fold validates one of them (the merge's rule for small tasks)
    assert {c for s in new_splits for c in s["val"] if c.startswith("Kidney_")} == set(kidney.labeled)


def test_grown_union_is_preprocessed_with_the_models_plans(grown):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    pre = grown["pre"]
    model_plans = _load(join(grown["model"], "plans.json"))
    plans = _load(join(pre, NEW, "nnUNetPlans.json"))
    assert plans["dataset_name"] == NEW
    for key in ("configurations", "original_median_spacing_after_transp", "transpose_forward"):
        assert plans[key] == model_plans[key]
    table = TaskTable.from_plans(plans)
    assert table.names == ["Liver", "Atrium", "Kidney"]
    labeled = sorted(c for t in table.tasks for c in t.labeled)
    assert sorted(nnUNetDatasetBlosc2.get_identifiers(join(pre, NEW, "nnUNetPlans_2d"))) == labeled
    unlabeled = sorted(c for t in table.tasks for c in t.unlabeled)
    assert sorted(nnUNetDatasetBlosc2.get_identifiers(join(pre, NEW, "nnUNetPlans_2d_unlabeled"))) == unlabeled
    # an old case preprocessed again with the same plans equals the model's own preprocessed copy
    case = table.tasks[0].labeled[0]
    a, _ = nnUNetDatasetBlosc2(join(pre, OLD, "nnUNetPlans_2d"), [case]).load_case(case)[:2]
    b, _ = nnUNetDatasetBlosc2(join(pre, NEW, "nnUNetPlans_2d"), [case]).load_case(case)[:2]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _networks(grown):
    """(old network with the model's weights, grown network as stock load_pretrained_weights loads it, tables)."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_versemi.training.variants import VerSemiTrainer_tiny

    def build(plans, dj):
        pm = PlansManager(plans)
        return VerSemiTrainer_tiny.build_network_architecture(
            pm, pm.get_configuration("2d"), 1, len(dj["labels"]), False).eval()

    old_plans, old_dj = _load(join(grown["model"], "plans.json")), _load(join(grown["model"], "dataset.json"))
    new_plans = _load(join(grown["pre"], NEW, "nnUNetPlans.json"))
    new_dj = _load(join(grown["pre"], NEW, "dataset.json"))
    old = build(old_plans, old_dj)
    ck = torch.load(join(grown["model"], "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    old.load_state_dict(ck["network_weights"])
    new = build(new_plans, new_dj)
    load_pretrained_weights(new, grown["warm"])  # nnU-Net's own loader, as -pretrained_weights calls it
    return old, new, TaskTable.from_plans(old_plans), TaskTable.from_plans(new_plans)


def _old_images(grown, n: int = 4) -> torch.Tensor:
    """Preprocessed 2d slices of old tasks' labeled cases (as the network sees them)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    folder = join(grown["pre"], OLD, "nnUNetPlans_2d")
    ds = nnUNetDatasetBlosc2(folder)
    out = []
    for case in sorted(ds.identifiers)[:n]:
        data = np.asarray(ds.load_case(case)[0])
        out.append(torch.from_numpy(data[:, data.shape[1] // 2, :16, :16].astype(np.float32)))
    return torch.stack(out)


def test_warm_start_gives_old_prompts_identical_outputs_right_after_loading(grown):
    old, new, old_t, new_t = _networks(grown)
    x = torch.cat([_old_images(grown), torch.randn(2, 1, 16, 16)])
    b = x.shape[0]
    with torch.no_grad():
        for p_old, p_new in [*[(t, t) for t in range(old_t.num_tasks)], (old_t.synthetic_prompt, new_t.synthetic_prompt)]:
            n = old.num_classes_per_prompt[p_old]
            a = old(x, torch.full((b, 1), p_old))[0][:, 0, :n]
            g = new(x, torch.full((b, 1), p_new))[0][:, 0, :n]
            torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-5)
        # the new prompt starts as the synthetic task: background and "any foreground" for each of its classes
        syn = old(x, torch.full((b, 1), old_t.synthetic_prompt))[0][:, 0]
        kid = new(x, torch.full((b, 1), new_t.index("Kidney")))[0][:, 0]
        torch.testing.assert_close(kid[:, :2], syn[:, :2], rtol=1e-5, atol=1e-5)
        # stock (prompt-free) prediction routes old images as before: same merged logits on the old labels
        with old.recording_task_probabilities() as p_old, new.recording_task_probabilities() as p_new:
            a, g = old(x), new(x)
        assert torch.equal(p_old[0].argmax(1), p_new[0].argmax(1))
        torch.testing.assert_close(g[:, :old_t.num_merged_labels], a, rtol=1e-5, atol=1e-5)
        assert (p_new[0].argmax(1) < old_t.num_tasks).all()  # never routed to the new task


def test_stock_train_with_pretrained_weights_and_teacher_from_loaded_weights(grown, tmp_path, monkeypatch):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.run.run_training import get_trainer_from_args

    res = _run(["nnUNetv2_train", "610", "2d", "0", "-tr", TRAINER, "-device", "cpu",
                "-pretrained_weights", grown["warm"]], grown["env"])
    assert "Loading pretrained weights" in res.stdout
    folder = join(grown["res"], NEW, f"{TRAINER}__nnUNetPlans__2d")
    assert isfile(join(folder, "fold_0", "checkpoint_final.pth"))
    summary = _load(join(folder, "fold_0", "validation", "summary.json"))
    assert set(summary["versemi_per_task"]) == {"Liver", "Atrium", "Kidney"}

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    trainer = get_trainer_from_args("610", "2d", 0, TRAINER, "nnUNetPlans", device=torch.device("cpu"))
    trainer.initialize()
    load_pretrained_weights(trainer.network, grown["warm"])
    student = trainer.network.state_dict()
    assert not all(torch.equal(student[k], v) for k, v in trainer.ema_network.state_dict().items())
    trainer.on_train_start()
    try:
        teacher = trainer.ema_network.state_dict()
        assert all(torch.equal(student[k], v) for k, v in teacher.items())
    finally:
        trainer.on_train_end()


def test_stock_and_task_prediction_with_the_grown_model(grown, tmp_path):
    env = grown["env"]
    _run(["nnUNetv2_predict", "-i", join(grown["raw"], NEW, "imagesTs"), "-o", str(tmp_path / "stock"), "-d", "610",
          "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    table = TaskTable.from_dataset_json(_load(join(grown["raw"], NEW, "dataset.json")))
    cases = sorted(c for t in table.tasks for c in t.test)
    assert sorted(f[:-7] for f in os.listdir(tmp_path / "stock") if f.endswith(".nii.gz")) == cases
    for c in cases:
        assert S.read(str(tmp_path / "stock" / f"{c}.nii.gz")).max() <= table.num_merged_labels - 1
    src = join(grown["raw"], "Dataset503_Kidney", "imagesTs")
    for task in ("Kidney", "auto"):
        out = tmp_path / task
        _run(["nnUNetv2_versemi_predict", "-i", src, "-o", str(out), "-d", "610", "-c", "2d", "-f", "0",
              "-tr", TRAINER, "--task", task, "-device", "cpu"], env)
        written = [f for f in os.listdir(out) if f.endswith(".nii.gz")]
        assert len(written) == 1
        assert set(np.unique(S.read(str(out / written[0])))) <= {0, 1, 2}  # Kidney's own source labels


def _nothing_written(grown, fn) -> None:
    before = {v: sorted(os.listdir(grown[k])) for k, v in (("raw", "raw"), ("pre", "pre"), ("res", "res"))}
    fn()
    after = {v: sorted(os.listdir(grown[k])) for k, v in (("raw", "raw"), ("pre", "pre"), ("res", "res"))}
    assert after == before


def _add(argv: list[str]) -> None:
    add_task_main(["-d", "600", "-c", "2d", "-tr", TRAINER, "-o", "620", "--no-pbar", "-np", "1", *argv])


@pytest.mark.parametrize("make, argv, message", [
    (None, ["-a", "501"], "already in the union"),
    (None, ["-a", "503", "--task-names", "Atrium"], "already in the union"),
    ("two_channels", ["-a", "505"], "the model takes 1"),
    (None, ["-a", "600"], "is the union itself"),
])
def test_ill_input_fails_before_anything_is_written(grown, capsys, make, argv, message):
    if make == "two_channels" and not os.path.isdir(join(grown["raw"], "Dataset505_Pelvis")):
        S.make_dataset(grown["raw"], 505, "Pelvis", "MR", 2, channels=2, seed=5)

    def call():
        with pytest.raises(SystemExit) as e:
            _add(argv)
        assert e.value.code == 2

    _nothing_written(grown, call)
    assert message in capsys.readouterr().err


def test_ill_model_that_cannot_take_the_images_or_is_not_versemi(grown, capsys, monkeypatch):
    from nnunetv2_versemi.data.add_task import AddTaskError, add_tasks
    from nnunetv2_versemi.training import warm_start as W

    # 2d images for a 3d configuration
    if not os.path.isdir(join(grown["raw"], "Dataset506_Flat")):
        S.make_dataset(grown["raw"], 506, "Flat", "MR", 2, shape=(1, 16, 16), seed=6)
    model = W.load_trained_model("600", "2d", TRAINER, "nnUNetPlans", ["0"])
    model.plans = json.loads(json.dumps(model.plans))
    model.plans["configurations"]["2d"]["spacing"] = [1.0, 1.0, 1.0]
    with pytest.raises(AddTaskError, match="holds 2d images"):
        _nothing_written(grown, lambda: add_tasks(model, [506], 620, progress=False))

    # a checkpoint without VerSemi's state, and a model folder of another trainer
    fold = join(grown["model"], "fold_0")
    ck = torch.load(join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    ck.pop("versemi")
    torch.save(ck, join(fold, "checkpoint_plain.pth"))
    for argv, message in ((["-chk", "checkpoint_plain.pth"], "not a VerSemi checkpoint"),
                          (["-chk", "checkpoint_none.pth"], "holds checkpoint_none.pth"),
                          (["-f", "3"], "Missing checkpoint")):
        with pytest.raises(SystemExit):
            _nothing_written(grown, lambda argv=argv: _add(["-a", "503", *argv]))
        assert message in capsys.readouterr().err
    other = join(grown["res"], OLD, "nnUNetTrainer__nnUNetPlans__2d")
    shutil.copytree(grown["model"], other)
    try:
        with pytest.raises(SystemExit):
            add_task_main(["-d", "600", "-c", "2d", "-tr", "nnUNetTrainer", "-o", "620", "-a", "503", "--no-pbar"])
        assert "not a VerSemi" in capsys.readouterr().err
    finally:
        shutil.rmtree(other)
        os.remove(join(fold, "checkpoint_plain.pth"))
