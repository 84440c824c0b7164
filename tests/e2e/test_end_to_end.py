"""The user's path on tiny demo data (one augmentation worker: the spawned loaders must pickle): generate -> merge -> plan/preprocess -> stock nnUNetv2_train with
VerSemiTrainer -> --c -> nnUNetv2_versemi_predict --task -> evaluate. One shared setup (module fixture)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from os.path import isfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_versemi.discovery import ext_trainer_dir

from _synth import train_batches

UNION_ID = 950
UNION = "Dataset950_VerSemiUnion"
TRAINER = "VerSemiTrainer_EMA_tiny"


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"),
               nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", nnUNet_extTrainer=ext_trainer_dir(),
               nnUNet_compile="false")
    with pytest.MonkeyPatch.context() as mp:
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_def_n_proc",
                  "nnUNet_extTrainer", "nnUNet_compile"):
            mp.setenv(k, env[k])
        _run(["nnUNetv2_versemi_demo_data", "--num-labeled", "4", "--num-unlabeled", "2", "--num-test", "1"], env)
        _run(["nnUNetv2_versemi_merge", "-d", "901", "902", "903", "-o", str(UNION_ID), "--labeled-cases", "3",
              "-np", "1", "--no-pbar"], env)
        _run(["nnUNetv2_versemi_plan_and_preprocess", "-d", str(UNION_ID), "-c", "2d", "-np", "1", "-npfp", "1",
              "--no_pbar"], env)
        train = _run(["nnUNetv2_train", str(UNION_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
        yield {"root": root, "env": env, "train_log": train.stdout,
               "model": root / "res" / UNION / f"{TRAINER}__nnUNetPlans__2d"}


def test_stock_training_writes_versemi_results(pipeline):
    fold = pipeline["model"] / "fold_0"
    assert isfile(fold / "checkpoint_final.pth")
    assert isfile(fold / "progress_versemi.png") and os.path.getsize(fold / "progress_versemi.png") > 0
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER
    assert ckpt["versemi"]["global_step"] == 6  # 2 epochs x 3 iterations
    assert ckpt["versemi"]["ema_weights"] is not None
    logged = ckpt["logging"]
    for term in ("sup", "syn"):
        assert len(logged[f"versemi_{term}"]) == 2 and np.isfinite(logged[f"versemi_{term}"]).all()
    # two stages: epoch 0 labeled terms only (with L_spec), epoch 1 adds the unlabeled term, drops L_spec
    assert logged["versemi_unsup_lambda"] == [0.0, 1.0]
    assert np.isfinite(logged["versemi_spec"][0]) and np.isnan(logged["versemi_spec"][1])
    assert np.isnan(logged["versemi_unsup"][0]) and np.isfinite(logged["versemi_unsup"][1])
    # the switch is decided on evidence and logged; here forced by the epoch limit (tiny run, empty heads)
    assert ckpt["versemi"]["switch_epoch"] == 1
    log_text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "unlabeled terms on from epoch 1 (step 3)" in log_text and "epoch limit" in log_text
    assert np.isnan(logged["versemi_unsup_kept"][0]) and 0 <= logged["versemi_unsup_kept"][1] <= 1
    import json

    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["versemi_per_task"]) == {"DemoCT", "DemoMR", "DemoMC"}
    assert all(v["n_cases"] >= 1 for v in summary["versemi_per_task"].values())
    # task recognition: trained every step, its accuracy per task logged every epoch
    assert len(logged["versemi_rec"]) == 2 and np.isfinite(logged["versemi_rec"]).all()
    assert np.array(logged["versemi_recognition"]).shape == (2, 3)
    assert "Task recognition accuracy per task" in log_text
    # final validation scores the prompt-free (stock) outputs; the prompted ones are an extra entry
    rec = summary["versemi_recognition"]
    assert rec["routing"] == "recognised" and set(rec["accuracy_per_task"]) == {"DemoCT", "DemoMR", "DemoMC"}
    val_cases = {os.path.basename(c["reference_file"]).split(".")[0] for c in summary["metric_per_case"]}
    assert set(rec["cases"]) == val_cases
    assert all(0 < c["probability"] <= 1 for c in rec["cases"].values())
    assert summary["versemi_prompted"]["folder"] == "validation_prompted"
    assert set(summary["versemi_prompted"]["per_task"]) == {"DemoCT", "DemoMR", "DemoMC"}
    assert isfile(fold / "validation_prompted" / "summary.json")


def test_stock_predict_scores_what_validation_scored(pipeline):
    """nnU-Net's final validation and stock nnUNetv2_predict on the same cases give the same Dice (the
    validation scores the prompt-free forward that stock predict runs)."""
    import json
    import shutil

    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    root, fold = pipeline["root"], pipeline["model"] / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    cases = sorted(os.path.basename(c["reference_file"]).split(".")[0] for c in summary["metric_per_case"])
    inp = root / "val_images"
    inp.mkdir()
    for c in cases:
        shutil.copy(root / "raw" / UNION / "imagesTr" / f"{c}_0000.nii.gz", inp)
    out = root / "val_stock"
    _run(["nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", str(UNION_ID), "-c", "2d", "-f", "0", "-tr",
          TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1"], pipeline["env"])
    stock = compute_metrics_on_folder(str(root / "raw" / UNION / "labelsTr"), str(out), str(root / "stock.json"),
                                      SimpleITKIO(), ".nii.gz", [1, 2, 3, 4], None, 1, chill=True)
    assert len(stock["metric_per_case"]) == len(cases)
    assert abs(stock["foreground_mean"]["Dice"] - summary["foreground_mean"]["Dice"]) < 0.01


def test_continue_restores_identical_state(pipeline):
    from nnunetv2.run.run_training import get_trainer_from_args

    fold = pipeline["model"] / "fold_0"
    saved = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    trainer = get_trainer_from_args(str(UNION_ID), "2d", 0, TRAINER, "nnUNetPlans", device=torch.device("cpu"))
    trainer.initialize()
    trainer.load_checkpoint(str(fold / "checkpoint_final.pth"))
    assert trainer.global_step == saved["versemi"]["global_step"]
    assert trainer.current_epoch == saved["current_epoch"]
    for k, v in trainer.network.state_dict().items():
        assert torch.equal(v.cpu(), saved["network_weights"][k]), k
    for k, v in trainer.ema_network.state_dict().items():
        assert torch.equal(v.cpu(), saved["versemi"]["ema_weights"][k]), k
    # EMA differs from the student: it is a real second state, not a copy
    assert any(not torch.equal(v, saved["network_weights"][k]) for k, v in saved["versemi"]["ema_weights"].items())
    assert trainer.optimizer.state_dict()["state"].keys() == saved["optimizer_state"]["state"].keys()
    assert trainer.switch_epoch == saved["versemi"]["switch_epoch"] == 1
    # the stock --c path runs to completion from that checkpoint
    _run(["nnUNetv2_train", str(UNION_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu", "--c"], pipeline["env"])
    again = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert again["versemi"]["global_step"] == saved["versemi"]["global_step"]


def _fresh_trainer(pipeline, tmp_path, monkeypatch, name="VerSemiTrainer", **attrs):
    from nnunetv2.run.run_training import get_trainer_from_args

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    from nnunetv2_versemi.training.config import VerSemiConfig

    trainer = get_trainer_from_args(str(UNION_ID), "2d", 0, name, "nnUNetPlans", device=torch.device("cpu"))
    hyper = {f.name for f in dataclasses.fields(VerSemiConfig)}
    changes = {k: v for k, v in attrs.items() if k in hyper}
    if changes:  # plain nnU-Net trainers have no VerSemi config
        trainer.config = dataclasses.replace(trainer.config, **changes)
    for k, v in attrs.items():
        if k not in hyper:
            setattr(trainer, k, v)
    trainer.initialize()
    return trainer


def _log_epoch(trainer, per_task_dice: list[float]) -> None:
    """What nnU-Net's validation logs for one epoch: pseudo Dice per merged class (DemoMC has two)."""
    ct, mr, mc = per_task_dice
    trainer.logger.get_checkpoint()["dice_per_class_or_region"].append([ct, mr, mc, mc])


def _log_text(trainer) -> str:
    return open(trainer.log_file).read()


def test_switch_on_evidence_and_state_survives_checkpoint(pipeline, tmp_path, monkeypatch):
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch, num_epochs=10, stage1_min_fraction=0.2,
                             stage1_fraction=0.6, switch_dice=0.5)
    # epoch 0: every task good, but before stage1_min_fraction (epoch 2): stays in stage 1
    _log_epoch(trainer, [0.9, 0.9, 0.9])
    trainer.maybe_switch()
    assert trainer.switch_epoch is None and trainer.unlabeled_weight(1) == 0
    trainer.current_epoch = 1
    _log_epoch(trainer, [0.9, 0.4, 0.9])  # DemoMR below the threshold
    trainer.maybe_switch()
    assert trainer.switch_epoch is None
    trainer.current_epoch = 2
    _log_epoch(trainer, [0.9, 0.7, 0.6])
    trainer.maybe_switch()
    assert trainer.switch_epoch == 3
    assert "unlabeled terms on from epoch 3" in _log_text(trainer) and "every task's pseudo Dice" in _log_text(trainer)
    assert "WARNING" not in _log_text(trainer)  # every task had learned its foreground
    assert [trainer.unlabeled_weight(e) for e in (2, 3, 9)] == [0.0, 1.0, 1.0]
    # --c: the switch travels in the checkpoint, before and after it
    trainer.current_epoch = 3
    trainer.save_checkpoint(str(tmp_path / "after.pth"))
    again = _fresh_trainer(pipeline, tmp_path, monkeypatch, num_epochs=10)
    again.load_checkpoint(str(tmp_path / "after.pth"))
    assert again.switch_epoch == 3 and again.unlabeled_weight() == 1.0
    assert again._in_stage_two()
    trainer.switch_epoch = None
    trainer.save_checkpoint(str(tmp_path / "before.pth"))
    again = _fresh_trainer(pipeline, tmp_path, monkeypatch, num_epochs=10)
    again.load_checkpoint(str(tmp_path / "before.pth"))
    assert again.switch_epoch is None and again.unlabeled_weight() == 0.0


def test_checkpoint_write_interrupted_keeps_previous(pipeline, tmp_path, monkeypatch):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as stock

    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch)
    path = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(path))
    good = path.read_bytes()
    real_save = torch.save

    def killed_mid_write(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a zip")  # what a SIGKILL during torch.save leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(stock.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(path))
    monkeypatch.setattr(stock.torch, "save", real_save)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == [path.name]
    assert torch.load(path, map_location="cpu", weights_only=False)["versemi"]["global_step"] == 0


def test_switch_forced_at_epoch_limit_names_weak_tasks_and_ramp_starts_there(pipeline, tmp_path, monkeypatch):
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch, num_epochs=10, stage1_fraction=0.3,
                             unsup_schedule="ramp", rampup_fraction=0.4)
    for epoch in range(3):
        trainer.current_epoch = epoch
        _log_epoch(trainer, [0.0, 0.8, float("nan")])
        trainer.maybe_switch()
    assert trainer.switch_epoch == 3
    text = _log_text(trainer)
    assert "epoch limit stage1_fraction=0.3" in text and "DemoCT, DemoMC" in text
    assert "WARNING: the unlabeled terms start before DemoCT, DemoMC learned their foreground" in text
    lam = [trainer.unlabeled_weight(e) for e in range(2, 9)]
    assert lam[0] == 0 and 0 < lam[1] < 0.01 and lam[1] < lam[2] < lam[3] < lam[4] and lam[-1] == 1.0


def test_empty_target_warning_names_tasks(pipeline, tmp_path, monkeypatch):
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch, empty_warning_epochs=2)
    log = trainer.logger.get_checkpoint()
    for epoch in range(3):
        log["versemi_unsup_kept"].append(0.0)
        # DemoMR's head finds foreground on some unlabeled mixes, DemoCT's and DemoMC's never
        trainer._warn_if_empty(np.array([[0.0, 0.02, 0.0], [0.0, 0.0, 0.0]]))
        if epoch == 0:
            assert "P_agg" not in _log_text(trainer)
    text = _log_text(trainer)
    assert "WARNING: P_agg has been (almost) empty for 2 epochs" in text
    assert "unlabeled images: DemoCT, DemoMC." in text
    log["versemi_unsup_kept"].append(0.5)
    trainer._warn_if_empty(np.array([[0.1, 0.02, 0.3]]))
    assert trainer._empty_epochs == 0


def test_end_of_training_names_the_tasks_that_never_learned_their_foreground(pipeline, tmp_path, monkeypatch):
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch, empty_warning_epochs=2)
    _log_epoch(trainer, [0.0, 0.9, 0.0])
    assert trainer.warn_unlearned_tasks() == [] and "WARNING" not in _log_text(trainer)  # fewer epochs than 2
    # DemoCT: 0 in its last two epochs; DemoMC: its NaN epoch is skipped, and the epoch before it was 0.3
    _log_epoch(trainer, [0.0, 0.9, 0.3])
    _log_epoch(trainer, [0.0, 0.9, float("nan")])
    assert trainer.warn_unlearned_tasks() == ["DemoCT"]
    text = _log_text(trainer)
    assert "WARNING: DemoCT: online pseudo Dice 0 in each of the last 2 epochs" in text and "DemoMC:" not in text
    _log_epoch(trainer, [0.4, 0.9, 0.3])  # DemoCT found its foreground in the last epoch
    assert trainer.warn_unlearned_tasks() == []


def test_present_class_dice_is_built_into_the_hard_label_loss(pipeline, tmp_path, monkeypatch):
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from nnunetv2_versemi.training.losses import PresentClassDiceLoss

    stock = _fresh_trainer(pipeline, tmp_path, monkeypatch, name="VerSemiTrainer_nnunetDice")
    assert type(stock.loss.loss.dc) is MemoryEfficientSoftDiceLoss
    default = _fresh_trainer(pipeline, tmp_path, monkeypatch)
    dc = default.loss.loss.dc
    assert isinstance(dc, PresentClassDiceLoss) and dc.batch_dice == default.configuration_manager.batch_dice


def test_plain_nnunet_trainer_with_present_class_dice(pipeline, tmp_path, monkeypatch):
    """nnUNetTrainer_presentClassDice: nnU-Net's loss (same deep-supervision weights, same CE) with the
    present-class Dice; the trainer nnU-Net finds by name for one dataset."""
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from nnunetv2_versemi.training.losses import PresentClassDiceLoss

    stock = _fresh_trainer(pipeline, tmp_path, monkeypatch, name="nnUNetTrainer")
    ours = _fresh_trainer(pipeline, tmp_path, monkeypatch, name="nnUNetTrainer_presentClassDice")
    assert type(stock.loss.loss.dc) is MemoryEfficientSoftDiceLoss
    assert type(ours.loss.loss.dc) is PresentClassDiceLoss and not ours.loss.loss.dc.do_bg
    assert list(ours.loss.weight_factors) == pytest.approx(list(stock.loss.weight_factors))
    # on a batch where every class is present the two Dice terms agree; with a class absent they differ
    torch.manual_seed(0)
    x = [torch.randn(2, 4, 8, 8)]
    y = [torch.randint(0, 4, (2, 1, 8, 8))]
    assert float(ours.loss.loss(x[0], y[0])) == pytest.approx(float(stock.loss.loss(x[0], y[0])), rel=1e-4)
    y0 = [torch.randint(0, 2, (2, 1, 8, 8))]
    assert float(ours.loss.loss(x[0], y0[0])) != pytest.approx(float(stock.loss.loss(x[0], y0[0])), rel=1e-3)


@pytest.mark.parametrize("attrs,message", [
    ({"switch_dice": 1.5}, "switch_dice must be a number in"),
    ({"stage1_min_fraction": 0.8, "stage1_fraction": 0.5}, "must not exceed stage1_fraction"),
    ({"unsup_min_foreground": -0.1}, "unsup_min_foreground must be"),
    ({"empty_warning_epochs": 0}, "empty_warning_epochs must be a positive integer"),
    ({"unsup_aggregate": "max"}, "unsup_aggregate must be 'source' or 'all'"),
    ({"pseudo_weight": -1.0}, "pseudo_weight must be a number >= 0"),
    ({"pseudo_threshold": 1.0}, "pseudo_threshold must be None or a number in"),
    ({"teacher_input": "both"}, "teacher_input must be 'unmixed' or 'mixed'"),
    ({"ema_alpha": 1.0}, r"ema_alpha must be a number in \[0, 1\)"),
    ({"ema_alpha": "0.99"}, "ema_alpha must be a number in"),
])
def test_ill_schedule_attributes_fail_at_initialize(pipeline, tmp_path, monkeypatch, attrs, message):
    with pytest.raises(ValueError, match=message):
        _fresh_trainer(pipeline, tmp_path, monkeypatch, **attrs)


def test_task_prediction_source_labels_geometry_and_equals_network(pipeline):
    raw = pipeline["root"] / "raw"
    src = raw / "Dataset902_DemoMR" / "imagesTs"
    out = pipeline["root"] / "pred_mr"
    _run(["nnUNetv2_versemi_predict", "-i", str(src), "-o", str(out), "-d", str(UNION_ID), "-c", "2d", "-f", "0",
          "-tr", TRAINER, "--task", "DemoMR", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
         pipeline["env"])
    cases = sorted(f for f in os.listdir(src) if f.endswith("_0000.nii.gz"))
    assert cases
    for f in cases:
        img = sitk.ReadImage(str(src / f))
        pred = sitk.ReadImage(str(out / f.replace("_0000", "")))
        assert pred.GetSize() == img.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), img.GetSpacing())
        np.testing.assert_allclose(pred.GetOrigin(), img.GetOrigin())
        np.testing.assert_allclose(pred.GetDirection(), img.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1}

    # the same case through the network called directly: the union image of that case, the task head only.
    # DemoMR's spacing equals the 2d plan's, and its slices fit in one patch, so no resampling or overlap.
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunetv2_versemi.training.trainer import VerSemiTrainer

    case = cases[0].replace("_0000.nii.gz", "")
    union_img = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / UNION / "imagesTs" / f"DemoMR_{case}_0000.nii.gz")))
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model = pipeline["model"]
    pm = PlansManager(load_json(str(model / "plans.json")))
    cm = pm.get_configuration("2d")
    assert cm.spacing == [1.25, 1.25]
    net = VerSemiTrainer.build_network_architecture(pm, cm, 1, 5, enable_deep_supervision=False)
    net.load_state_dict(torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                                   weights_only=False)["network_weights"])
    net.eval()
    task = pm.plans["versemi"]["tasks"][1]
    assert task["name"] == "DemoMR"
    padded, slicer = pad_nd_image(torch.from_numpy(union_img[:, None].astype(np.float32)), cm.patch_size, "constant",
                                  {"value": 0}, True)
    with torch.no_grad():
        logits = net(padded, torch.ones((padded.shape[0], 1), dtype=torch.long))[0][:, 0, :2]
    direct = logits[tuple([slice(None), slice(None), *slicer[2:]])].argmax(1).numpy()
    via_cli = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
    assert direct.shape == via_cli.shape
    assert (direct == via_cli).mean() > 0.999


def test_predict_all_writes_merged_maps_and_evaluate_reads_them(pipeline):
    root = pipeline["root"]
    src = root / "raw" / UNION / "imagesTs"
    out = root / "pred_all"
    _run(["nnUNetv2_versemi_predict", "-i", str(src), "-o", str(out), "-d", str(UNION_ID), "-c", "2d", "-f", "0",
          "-tr", TRAINER, "--task", "all", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
         pipeline["env"])
    preds = sorted(f for f in os.listdir(out) if f.endswith(".nii.gz"))
    assert len(preds) == 3 and preds[0].startswith("DemoC")
    for f in preds:
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f))))) <= {0, 1, 2, 3, 4}
    _run(["nnUNetv2_versemi_evaluate", "-ref", str(root / "raw" / UNION / "labelsTs"), "-pred", str(out), "-d",
          str(UNION_ID), "-o", str(root / "eval_all"), "-np", "1"], pipeline["env"])
    assert isfile(root / "eval_all" / "metrics.json") and isfile(root / "eval_all" / "summary.md")


def test_find_best_configuration_chooses_on_the_stock_outputs(pipeline):
    """nnU-Net's model selection and post-processing read fold_X/validation: the prompt-free outputs that stock
    nnUNetv2_predict writes, so the score it reports is the final validation's."""
    import json

    root, fold = pipeline["root"], pipeline["model"] / "fold_0"
    _run(["nnUNetv2_find_best_configuration", str(UNION_ID), "-c", "2d", "-tr", TRAINER, "-f", "0",
          "--disable_ensembling", "-np", "1"], pipeline["env"])
    info = json.loads((root / "res" / UNION / "inference_information.json").read_text())
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    (score,) = info["all_results"].values()
    assert score == pytest.approx(summary["foreground_mean"]["Dice"], abs=1e-6)
    assert isfile(pipeline["model"] / "crossval_results_folds_0" / "postprocessing.pkl")


def test_predict_auto_recognises_each_case_and_predicts_it_as_that_task(pipeline):
    """A folder mixing the source images of two tasks: each case is recognised (report in
    recognised_tasks.json) and written exactly as ``--task <recognised task>`` writes it."""
    import json
    import shutil

    root = pipeline["root"]
    mixed = root / "mixed_src"
    mixed.mkdir()
    for ds, prefix in (("Dataset901_DemoCT", "ct"), ("Dataset902_DemoMR", "mr")):
        for f in os.listdir(root / "raw" / ds / "imagesTs"):
            shutil.copy(root / "raw" / ds / "imagesTs" / f, mixed / f"{prefix}{f}")
    out = root / "pred_auto"
    common = ["-d", str(UNION_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta",
              "-npp", "1", "-nps", "1"]
    _run(["nnUNetv2_versemi_predict", "-i", str(mixed), "-o", str(out), *common], pipeline["env"])  # auto: default
    report = json.loads((out / "recognised_tasks.json").read_text())
    cases = sorted(f[:-len("_0000.nii.gz")] for f in os.listdir(mixed))
    assert sorted(report) == cases
    for case in cases:
        r = report[case]
        assert r["task"] in ("DemoCT", "DemoMR", "DemoMC")
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-3 and r["probability"] == max(r["probabilities"].values())
        # DemoMC shares DemoCT's file format and channel: a candidate; nothing else is
        assert set(k for k, v in r["probabilities"].items() if v > 0) <= {"DemoCT", "DemoMR", "DemoMC"}
    for task in sorted({r["task"] for r in report.values()}):
        group = [c for c in cases if report[c]["task"] == task]
        src, ref = root / f"auto_as_{task}", root / f"pred_as_{task}"
        src.mkdir()
        for case in group:
            shutil.copy(mixed / f"{case}_0000.nii.gz", src)
        _run(["nnUNetv2_versemi_predict", "-i", str(src), "-o", str(ref), "--task", task, *common], pipeline["env"])
        for case in group:
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(ref / f"{case}.nii.gz")))
            assert np.array_equal(a, b), case


def test_benchmark_recognition_scores_stock_prompted_and_all_heads(pipeline):
    import json

    root = pipeline["root"]
    out = root / "recognition"
    _run(["nnUNetv2_versemi_benchmark", "recognition", "-d", str(UNION_ID), "-c", "2d", "-tr", TRAINER, "-f", "0",
          "-o", str(out), "-device", "cpu", "--disable_tta"], pipeline["env"])
    result = json.loads((out / "recognition.json").read_text())
    assert result["command"].startswith(f"nnUNetv2_versemi_benchmark recognition -d {UNION_ID} -c 2d")
    assert result["n_cases"] == 3 and set(result["cases"]) == {f[:-len(".nii.gz")] for f in
                                                             os.listdir(root / "raw" / UNION / "labelsTs")}
    for mode in ("prompted", "recognised", "all_heads"):
        assert set(result["dice"][mode]) == {"DemoCT", "DemoMR", "DemoMC"}
        assert len(os.listdir(out / mode)) == 3
    for t, d in result["stock_minus_prompted"].items():
        assert d == pytest.approx(result["dice"]["recognised"][t] - result["dice"]["prompted"][t])
    for case, r in result["cases"].items():
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "recognised" / f"{case}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "prompted" / f"{case}.nii.gz")))
        if r["patches_recognised"] == 1.0:  # every patch routed to its own task: the prompted output exactly
            assert np.array_equal(a, b), case
    assert result["time_ratio_recognised_vs_all_heads"]["median"] > 0
    assert "stock (recognised)" in (out / "recognition.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--task", "Liver"], "Valid tasks: DemoCT, DemoMR, DemoMC"),
    (["--task", "DemoMR", "-f", "3"], "Missing checkpoint_final.pth for fold(s) 3"),
    (["--task", "DemoMR", "-tr", "nnUNetTrainer"], "does not exist"),
])
def test_ill_predict_input(pipeline, args, message):
    src = pipeline["root"] / "raw" / "Dataset902_DemoMR" / "imagesTs"
    base = ["nnUNetv2_versemi_predict", "-i", str(src), "-o", str(pipeline["root"] / "never"), "-d", str(UNION_ID),
            "-c", "2d", "-device", "cpu"]
    if "-tr" not in args:
        base += ["-tr", TRAINER]
    res = subprocess.run(base + args, env=pipeline["env"], capture_output=True, text=True)
    assert res.returncode == 2
    assert message in res.stderr
    assert not (pipeline["root"] / "never").exists()


def test_ill_trainer_input_fails_before_training(pipeline, tmp_path):
    """A dataset without a task table fails at construction, naming the problem, with nothing written."""
    from nnunetv2_versemi.tasktable import TaskTableError
    from nnunetv2_versemi.training.trainer import VerSemiTrainer

    plans = __import__("json").loads((pipeline["model"] / "plans.json").read_text())
    dataset_json = __import__("json").loads((pipeline["model"] / "dataset.json").read_text())
    del plans["versemi"]
    with pytest.raises(TaskTableError, match="task table"):
        VerSemiTrainer(dict(plans, continue_training=False), "2d", 0, dataset_json, torch.device("cpu"))
    plans = __import__("json").loads((pipeline["model"] / "plans.json").read_text())
    dataset_json["labels"] = {"background": 0, "x": 1}
    with pytest.raises(TaskTableError, match="do not match"):
        VerSemiTrainer(dict(plans, continue_training=False), "2d", 0, dataset_json, torch.device("cpu"))


def test_missing_unlabeled_images_fail_at_initialize(pipeline, tmp_path, monkeypatch):
    import shutil

    from nnunetv2.run.run_training import get_trainer_from_args

    pre = pipeline["root"] / "pre"
    copy = tmp_path / "pre"
    shutil.copytree(pre, copy)
    shutil.rmtree(copy / UNION / "nnUNetPlans_2d_unlabeled")
    monkeypatch.setenv("nnUNet_preprocessed", str(copy))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    trainer = get_trainer_from_args(str(UNION_ID), "2d", 0, "VerSemiTrainer_tiny", "nnUNetPlans",
                                    device=torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="No preprocessed unlabeled images"):
        trainer.initialize()
    trainer = get_trainer_from_args(str(UNION_ID), "2d", 0, "VerSemiTrainer_noUnsup_tiny", "nnUNetPlans",
                                    device=torch.device("cpu"))
    trainer.initialize()  # labeled-only VerSemi needs no unlabeled images
    assert trainer.uses_unlabeled is False


def test_partial_unlabeled_set_fails_at_initialize_naming_cases(pipeline, tmp_path, monkeypatch):
    """A plan_and_preprocess killed during the unlabeled step leaves part of the set: the trainer refuses it."""
    import shutil

    from nnunetv2.run.run_training import get_trainer_from_args

    copy = tmp_path / "pre"
    shutil.copytree(pipeline["root"] / "pre", copy)
    folder = copy / UNION / "nnUNetPlans_2d_unlabeled"
    victim = sorted(f for f in os.listdir(folder) if f.endswith(".b2nd"))[0]
    os.remove(folder / victim)
    monkeypatch.setenv("nnUNet_preprocessed", str(copy))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    trainer = get_trainer_from_args(str(UNION_ID), "2d", 0, "VerSemiTrainer_tiny", "nnUNetPlans",
                                    device=torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match=f"1 unlabeled case.*{victim[:-len('.b2nd')]}.*--only-unlabeled"):
        trainer.initialize()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))


@pytest.mark.parametrize("pseudo_weight", [1.0, 0.0])
def test_pseudo_term_runs_in_stage_two_only(pipeline, tmp_path, monkeypatch, pseudo_weight):
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch, pseudo_weight=pseudo_weight)
    labeled, unlabeled = train_batches(trainer)
    trainer.dataloader_unlabeled = iter([unlabeled] * 2)
    stage1 = trainer.train_step(labeled)
    assert np.isnan(stage1["pseudo"]) and np.isnan(stage1["unsup"])
    trainer.switch_epoch = 0  # stage 2 from now on
    stage2 = trainer.train_step(labeled)
    assert np.isfinite(stage2["unsup"])
    if pseudo_weight > 0:
        assert np.isfinite(stage2["pseudo"]) and stage2["pseudo"] > 0
    else:
        assert np.isnan(stage2["pseudo"])


@pytest.mark.parametrize("name", ["VerSemiTrainer", "VerSemiTrainer_pseudoTeacher"])
def test_default_trains_on_confident_ema_teacher_labels(pipeline, tmp_path, monkeypatch, name):
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch, name=name)
    assert trainer.ema_network is not None and trainer.config.pseudo_threshold == 0.9
    assert trainer.config.pseudo_weight == 1.0
    labeled, unlabeled = train_batches(trainer)
    trainer.dataloader_unlabeled = iter([unlabeled] * 2)
    trainer.switch_epoch = 0
    before = {k: v.clone() for k, v in trainer.ema_network.state_dict().items()}
    out = trainer.train_step(labeled)
    assert np.isfinite(out["pseudo"]) and np.isfinite(out["unsup"])
    assert any(not torch.equal(before[k], v) for k, v in trainer.ema_network.state_dict().items())


@pytest.mark.parametrize("name, teacher_images, student_prompts",
                         [("VerSemiTrainer_unmixedTeacher", 1, "own"), ("VerSemiTrainer_pseudoTeacher", 2, "own"),
                          ("VerSemiTrainer_paperTerms", 0, "every")])
def test_teacher_passes_and_student_heads_on_the_unlabeled_mix(pipeline, tmp_path, monkeypatch, name,
                                                               teacher_images, student_prompts):
    """The unmixed-teacher form runs the EMA teacher once per step, on the unmixed images, and the student only
    the two region tasks' heads and the synthetic one on the unlabeled mix; the mixed-teacher form runs the
    teacher once on the unmixed images and the mixes together, and a student-made P_agg needs every task
    head."""
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch, name=name)
    labeled, unlabeled = train_batches(trainer)
    trainer.dataloader_unlabeled = iter([unlabeled])
    trainer.switch_epoch = 0
    calls, prompts = [], []
    if trainer.ema_network is not None:
        trainer.ema_network.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    trainer.network.register_forward_hook(lambda m, args, out: prompts.append(args[1]))
    out = trainer.train_step(labeled)
    assert np.isfinite(out["unsup"])
    assert calls == ([teacher_images * unlabeled["data"].shape[0]] if teacher_images else [])
    T, syn = trainer.task_table.num_tasks, trainer.task_table.synthetic_prompt
    unlabeled_prompts = prompts[0][-1]
    assert bool((unlabeled_prompts[:, -1] == syn).all())
    if student_prompts == "own":
        u_tasks = trainer._task_ids(unlabeled["keys"])
        assert torch.equal(unlabeled_prompts[:, :2], torch.stack((u_tasks, u_tasks.roll(1)), dim=1))
        assert unlabeled_prompts.shape[1] == 3
    else:
        assert unlabeled_prompts.shape[1] == T + 1
        assert torch.equal(unlabeled_prompts[:, :T], torch.arange(T)[None].expand(len(unlabeled_prompts), -1))


@pytest.mark.parametrize("name", ["VerSemiTrainer_unmixedTeacher", "VerSemiTrainer_pseudoTeacher"])
def test_teacher_p_agg_on_the_unmixed_images_or_on_the_mix(pipeline, tmp_path, monkeypatch, name):
    """Unmixed teacher input: every task's foreground of the teacher on the unmixed images, cut with the mix's box; mixed
    teacher input: the teacher's on the mix itself (computed in the same call as the pseudo labels)."""
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch, name=name)
    labeled, unlabeled = train_batches(trainer)
    trainer.dataloader_unlabeled = iter([unlabeled])
    batch, _ = trainer._to_device(labeled)
    torch.manual_seed(3)
    un = trainer._unlabeled_mix(batch)
    u = unlabeled["data"]
    unmixed = trainer.config.teacher_input == "unmixed"
    assert unmixed == (name == "VerSemiTrainer_unmixedTeacher")
    x = u if unmixed else un.x
    with torch.no_grad():
        teacher = trainer.ema_network(x, trainer.ema_network.task_prompts(x.shape[0], x.device))
    fg = torch.stack([1 - torch.softmax(teacher[0][:, t, :c], 1)[:, 0]
                      for t, c in enumerate(trainer._num_classes[:-1])], dim=1)
    expected = torch.where(un.mask > 0.5, fg.roll(1, dims=0), fg) if unmixed else fg
    assert torch.allclose(un.task_fg[0], expected, atol=1e-5)
    assert 0 < float(un.mask.mean()) < 1
    assert len(un.task_fg) == len(teacher) and un.pseudo is not None


def test_ema_update_moves_the_teacher_by_one_minus_alpha(pipeline, tmp_path, monkeypatch):
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch)
    student = trainer._plain_network().state_dict()
    teacher = trainer.ema_network.state_dict()
    for v in teacher.values():
        if v.dtype.is_floating_point:
            v.zero_()
    trainer.teacher.update(trainer._plain_network())
    floats = [k for k, v in teacher.items() if v.dtype.is_floating_point]
    assert len(floats) > 10
    for k in floats:
        assert torch.allclose(teacher[k], (1 - trainer.config.ema_alpha) * student[k]), k
    ints = [k for k, v in teacher.items() if not v.dtype.is_floating_point]
    assert all(torch.equal(teacher[k], student[k]) for k in ints)


def test_pseudo_targets_mix_each_task_heads_labels_on_the_unmixed_images(pipeline, tmp_path, monkeypatch):
    """Fake network: head t calls class 1 where the image is positive (t even) or negative (t odd). The target
    under the outside image's task is that head's labels on both unmixed images, cut together with the box."""
    import contextlib

    from nnunetv2_versemi.training import mixes
    from nnunetv2_versemi.training.teacher import every_head

    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch, target_source="detach", pseudo_threshold=None)
    T, C = trainer.task_table.num_tasks, max(trainer._num_classes)
    num_classes = trainer._num_classes[:-1]

    class Fake(torch.nn.Module):
        def task_prompts(self, n, device):
            return torch.arange(T, device=device)[None].expand(n, -1)

        def forward(self, x, prompts):
            sign = torch.tensor([1.0 if t % 2 == 0 else -1.0 for t in range(T)]).view(1, T, 1, 1)
            out = torch.zeros(x.shape[0], T, C, *x.shape[2:])
            out[:, :, 1] = 10 * sign * x
            return [out]

    g = torch.Generator().manual_seed(1)
    u = torch.randn(4, 1, 6, 6, generator=g)
    mu = torch.zeros(4, 1, 6, 6)
    mu[:, :, 2:5, 1:4] = 1
    u_tasks, partner_tasks = torch.tensor([0, 1, 2, 1]), torch.tensor([1, 0, 1, 2])
    partner = u.roll(1, dims=0)
    mix = mixes.UnlabeledMix(x=torch.where(mu > 0.5, partner, u), u=u, partner=partner, mask=mu, tasks=u_tasks,
                             partner_tasks=partner_tasks, partner_idx=None, prompts=None, rec_target=None,
                             every_task_head=True)
    unmixed = every_head(Fake(), [mix.unmixed_images()], contextlib.nullcontext)[0]
    outside, inside = mixes.pseudo_targets(mix, unmixed, num_classes, None)
    for i in range(4):
        for tasks, got in ((u_tasks, outside[0]), (partner_tasks, inside[0])):
            s = 1.0 if int(tasks[i]) % 2 == 0 else -1.0
            expected = torch.where(mu[i, 0] > 0.5, (s * partner[i, 0] > 0).long(), (s * u[i, 0] > 0).long())
            assert torch.equal(got[i, 0], expected), (i, int(tasks[i]))
    # with a threshold, labels whose probability is below it become -1 (ignored)
    outside_t, _ = mixes.pseudo_targets(mix, unmixed, num_classes, 0.9)
    x_out = mix.x[:, 0]
    conf = torch.stack([torch.softmax(Fake()(x_out[i:i + 1, None], None)[0][0, int(u_tasks[i]), :num_classes[
        int(u_tasks[i])]], 0).max(0).values for i in range(4)])
    unsure = conf < 0.9
    assert unsure.any() and (~unsure).any()
    assert torch.equal(outside_t[0][:, 0] == -1, unsure)
    assert torch.equal(outside_t[0][:, 0][~unsure], outside[0][:, 0][~unsure])


def test_continuing_a_bottleneck_classifier_checkpoint_converts_it(pipeline, tmp_path, monkeypatch):
    """A checkpoint whose task classifier read the bottleneck alone continues in the every-stage layout: the
    network keeps the architecture its trainer built, the optimizer holds that classifier, its stale momentum
    is dropped, both conversions are in nnU-Net's training log, and training goes on."""
    old = _fresh_trainer(pipeline, tmp_path, monkeypatch, name="VerSemiTrainer_bottleneckRecognition")
    assert old.network.recognition_input == "bottleneck"
    labeled, _ = train_batches(old)
    old.train_step(labeled)  # momentum for every parameter, the classifier's in its old shape
    path = str(tmp_path / "old.pth")
    old.save_checkpoint(path)
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch)
    trainer.load_checkpoint(path)
    net = trainer.network
    assert net.recognition_input == "stages"
    assert net.task_classifier[1].in_features == sum(net._stage_channels)
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in net.task_classifier.parameters())
    log = _log_text(trainer)
    assert "reads the pooled bottleneck only" in log and "starts afresh" in log
    out = trainer.train_step(labeled)
    assert np.isfinite(out["loss"])


def test_paper_terms_variant_has_no_teacher_and_no_pseudo_term(pipeline, tmp_path, monkeypatch):
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch, name="VerSemiTrainer_paperTerms")
    assert trainer.ema_network is None and trainer.config.target_source == "detach"
    labeled, unlabeled = train_batches(trainer)
    trainer.dataloader_unlabeled = iter([unlabeled])
    trainer.switch_epoch = 0
    out = trainer.train_step(labeled)
    assert np.isnan(out["pseudo"]) and np.isfinite(out["unsup"])


def test_teacher_starts_from_the_loaded_student_of_a_checkpoint_without_one(pipeline, tmp_path, monkeypatch):
    old = _fresh_trainer(pipeline, tmp_path, monkeypatch, name="VerSemiTrainer_paperTerms")
    with torch.no_grad():
        for p in old.network.parameters():
            p.add_(0.5)
    path = str(tmp_path / "paper_terms.pth")
    old.save_checkpoint(path)
    trainer = _fresh_trainer(pipeline, tmp_path, monkeypatch)
    trainer.load_checkpoint(path)
    student, teacher = trainer.network.state_dict(), trainer.ema_network.state_dict()
    assert all(torch.equal(student[k], v) for k, v in teacher.items())
