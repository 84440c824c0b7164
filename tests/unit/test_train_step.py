"""One VerSemi training step on a trainer built in memory (conftest.py): which loss terms each stage and variant
computes, and what the step changes (the student's weights, the EMA teacher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunetv2_versemi.training.terms import LOSS_TERMS
from nnunetv2_versemi.training.trainer import VerSemiTrainer
from nnunetv2_versemi.training.variants import VerSemiTrainer_officialMix, VerSemiTrainer_paperTerms

from _synth import train_batches

STAGE1 = {"sup", "syn", "spec", "rec"}  # labeled terms only, L_spec among them


def _terms(out: dict) -> set[str]:
    """The loss terms a step computed (it reports an absent one as NaN); each of them must be finite."""
    present = {k for k in LOSS_TERMS if not np.isnan(out[k])}
    assert all(np.isfinite(out[k]) for k in present), {k: float(out[k]) for k in present}
    return present


def _loss_is_the_sum_of(out: dict, terms: set[str]) -> None:
    # every weight is 1 by default, and the unlabeled weight lambda is 0 in stage 1, 1 in stage 2
    assert float(out["loss"]) == pytest.approx(sum(float(out[k]) for k in terms), rel=1e-5)


@pytest.mark.parametrize("cls, stage2", [
    (VerSemiTrainer, {"sup", "syn", "unsup", "pseudo", "rec"}),
    (VerSemiTrainer_officialMix, {"sup", "syn", "unsup", "pseudo", "cons", "rec"}),  # unlabeled x labeled mix
    (VerSemiTrainer_paperTerms, {"sup", "syn", "unsup", "rec"}),  # no L_pseudo, no teacher
], ids=["default", "officialMix", "paperTerms"])
def test_loss_terms_before_and_after_the_switch(make_trainer, cls, stage2):
    trainer = make_trainer(cls)
    assert (trainer.ema_network is None) == (cls is VerSemiTrainer_paperTerms)
    labeled, unlabeled = train_batches(trainer)
    assert len({trainer.task_table.task_of_case(k) for k in labeled["keys"]}) == trainer.task_table.num_tasks

    trainer.dataloader_unlabeled = iter(())  # stage 1 draws no unlabeled batch (an empty loader would stop it)
    out = trainer.train_step(labeled)
    assert _terms(out) == STAGE1
    assert float(out["unsup_lambda"]) == 0 and np.isnan(out["unsup_kept"])
    _loss_is_the_sum_of(out, STAGE1)

    trainer.switch_epoch = trainer.current_epoch  # the switch: the unlabeled terms are on from this epoch
    trainer.dataloader_unlabeled = iter([unlabeled])
    out = trainer.train_step(labeled)
    assert next(trainer.dataloader_unlabeled, None) is None  # one unlabeled batch drawn
    assert _terms(out) == stage2  # L_spec gone, the unlabeled terms on
    assert float(out["unsup_lambda"]) == 1 and 0 <= float(out["unsup_kept"]) <= 1
    assert out["task_fg"].shape == (trainer.task_table.num_tasks,) and np.isfinite(out["task_fg"]).all()
    _loss_is_the_sum_of(out, stage2)


def test_sup_finish_trains_l_sup_alone_in_the_closing_epochs(make_trainer):
    from nnunetv2_versemi.training.variants import VerSemiTrainer_supFinish

    trainer = make_trainer(VerSemiTrainer_supFinish)
    labeled, unlabeled = train_batches(trainer)
    trainer.num_epochs = 20
    trainer.switch_epoch = 2  # stage 2 since epoch 2
    trainer.current_epoch = 15  # the last 20 % are epochs 16-19
    trainer.dataloader_unlabeled = iter([unlabeled])
    out = trainer.train_step(labeled)
    assert _terms(out) == {"sup", "syn", "unsup", "pseudo", "rec"}
    trainer.current_epoch = 16
    trainer.dataloader_unlabeled = iter([unlabeled])
    out = trainer.train_step(labeled)
    assert _terms(out) == {"sup", "rec"} and float(out["unsup_lambda"]) == 0
    assert next(trainer.dataloader_unlabeled, None) is not None  # no unlabeled batch drawn
    _loss_is_the_sum_of(out, {"sup", "rec"})


@pytest.mark.parametrize("fraction, epochs, closing", [
    (0.2, 20, 4), (0.4, 20, 8), (0.2, 30, 6), (0.29, 100, 29), (0.4, 2, 0), (0.4, 8, 3), (0.0, 20, 0)])
def test_closing_phase_is_the_last_fraction_of_the_epochs_rounded_down(fraction, epochs, closing):
    from dataclasses import replace

    from nnunetv2_versemi.training.config import DEFAULT
    from nnunetv2_versemi.training.schedule import StageSchedule

    schedule = StageSchedule(replace(DEFAULT, sup_finish_fraction=fraction), active=True)
    assert schedule.sup_finish_epochs(epochs) == closing  # 0.29 x 100 is 28.999... in floating point
    assert [e for e in range(epochs) if schedule.in_sup_finish(e, epochs)] == list(range(epochs - closing, epochs))


def test_closing_phase_start_is_logged_once(make_trainer, monkeypatch):
    from nnunetv2_versemi.training.variants import VerSemiTrainer_supFinish

    trainer = make_trainer(VerSemiTrainer_supFinish)
    trainer.num_epochs = 20
    lines = []
    monkeypatch.setattr(trainer, "print_to_log_file", lambda *a, **k: lines.append(" ".join(map(str, a))))
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    monkeypatch.setattr(nnUNetTrainer, "on_epoch_start", lambda self: None)  # nnU-Net's own part
    for epoch in range(20):
        trainer.current_epoch = epoch
        trainer.on_epoch_start()
    assert [x for x in lines if "closing phase" in x] == [
        "VerSemi: closing phase from epoch 16 (the last 4 of 20 epochs, sup_finish_fraction=0.2): L_sup alone on the "
        "unmixed labeled images, every CutMix term off"]


def test_step_trains_the_student_and_moves_the_teacher_toward_it(make_trainer):
    trainer = make_trainer(VerSemiTrainer)
    labeled, unlabeled = train_batches(trainer)
    trainer.switch_epoch = 0
    trainer.dataloader_unlabeled = iter([unlabeled])
    student = dict(trainer.network.named_parameters())
    teacher = dict(trainer.ema_network.named_parameters())
    assert student.keys() == teacher.keys()
    before = {k: v.detach().clone() for k, v in student.items()}
    teacher_before = {k: v.detach().clone() for k, v in teacher.items()}
    assert all(torch.equal(before[k], teacher_before[k]) for k in before)  # the teacher starts as the student

    trainer.train_step(labeled)

    changed = {k for k in before if not torch.equal(before[k], student[k])}
    assert all(torch.isfinite(student[k]).all() for k in changed)
    # every part learns in one step: the backbone, the prompt-conditioned heads and the task classifier
    for part in ("backbone.encoder.", "backbone.decoder.", "heads.", "task_classifier."):
        assert any(k.startswith(part) for k in changed), f"no parameter of {part} changed"
    assert trainer.global_step == 1
    # the teacher moved from where it was toward the updated student, part of the way, along the line to it
    moved = torch.cat([(teacher[k] - teacher_before[k]).flatten() for k in changed])
    to_student = torch.cat([(student[k].detach() - teacher_before[k]).flatten() for k in changed])
    assert 0 < moved.norm() < to_student.norm()
    assert torch.nn.functional.cosine_similarity(moved, to_student, dim=0) > 0.999
    assert all(torch.equal(teacher[k], teacher_before[k]) for k in before.keys() - changed)
    assert all(p.grad is None for p in teacher.values())  # the teacher is not trained by the loss


def test_training_log_shows_the_task_table_as_counts(make_trainer):
    """The plans print in the training log lists no case ids (a large unlabeled pool would flood every log), and
    the trainer's plans keep the whole table."""
    from nnunetv2_versemi.tasktable import TABLE_KEY

    trainer = make_trainer(VerSemiTrainer)
    trainer.print_plans()
    with open(trainer.log_file) as f:
        log = f.read()
    assert "'unlabeled': '2 cases'" in log and "Kidney" in log
    assert "Kidney_u0" not in log and "Liver_l1" not in log
    assert trainer.plans_manager.plans[TABLE_KEY]["tasks"][1]["unlabeled"] == ["Kidney_u0", "Kidney_u1"]


def test_task_batches_put_one_planned_batch_per_task_in_each_step(make_trainer):
    """``task_batches``: T times the planned batch (labeled and unlabeled) in 1/T of the steps, rounded up, so every
    task sees as many patches; each task fills a planned batch of its own."""
    from nnunetv2_versemi.training.variants import VerSemiTrainer_taskBatches

    plain = make_trainer(VerSemiTrainer)
    trainer = make_trainer(VerSemiTrainer_taskBatches)
    T, planned = trainer.task_table.num_tasks, trainer.configuration_manager.batch_size
    assert plain.batch_size == planned and plain.num_iterations_per_epoch == 250
    assert trainer.batch_size == T * planned
    assert trainer.num_iterations_per_epoch == -(-250 // T) and trainer.num_val_iterations_per_epoch == -(-50 // T)
    with open(trainer.log_file) as f:
        assert f"{planned} patches per task and step, 84 training / 17 validation steps" in f.read()
    assert plain.unlabeled_global_batch() == planned and trainer.unlabeled_global_batch() == T * planned
    # a step over the whole batch moves the weights as T steps would: its loss counts T times (the log keeps the
    # loss itself, comparable with the default's)
    labeled, _ = train_batches(trainer)
    trainer.dataloader_unlabeled = iter(())
    stepped = []
    trainer._optimizer_step = lambda loss: stepped.append(float(loss))
    out = trainer.train_step(labeled)
    assert np.isfinite(float(out["loss"])) and stepped == [pytest.approx(T * float(out["loss"]), rel=1e-6)]
    plain._optimizer_step = lambda loss: stepped.append(float(loss))
    out = plain.train_step(train_batches(plain)[0])
    assert stepped[1] == pytest.approx(float(out["loss"]), rel=1e-6)


def test_task_batches_need_task_balanced_batches():
    from dataclasses import replace

    from nnunetv2_versemi.training.config import DEFAULT

    with pytest.raises(ValueError, match="task_batches needs labeled_balance 'tasks'"):
        replace(DEFAULT, task_batches=True, labeled_balance="cases")


def test_foreground_oversampling_reaches_the_labeled_loader(make_trainer):
    from nnunetv2_versemi.training.sampling import TaskBalancedDataLoader
    from nnunetv2_versemi.training.variants import VerSemiTrainer_foreground67

    assert make_trainer(VerSemiTrainer).oversample_foreground_percent == pytest.approx(0.33)
    trainer = make_trainer(VerSemiTrainer_foreground67)
    assert trainer.oversample_foreground_percent == pytest.approx(0.67)
    # the loader the trainer builds from that rate forces 3 of a batch of 4 (nnU-Net's rate: 1 of 4)
    loader = TaskBalancedDataLoader.__new__(TaskBalancedDataLoader)
    loader.batch_size, loader.oversample_foreground_percent = 4, trainer.oversample_foreground_percent
    assert loader.num_forced_slots() == 3
    loader.oversample_foreground_percent = 0.33
    assert loader.num_forced_slots() == 1



def test_per_task_nnunet_with_the_same_sampling(tmp_path, monkeypatch):
    """Benchmark method (g): plain nnU-Net whose only change is VerSemiTrainer_foreground67's forced share."""
    from conftest import CONFIGURATION, tiny_dataset_json, tiny_plans, tiny_table
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_versemi.benchmark.methods import method_by_name
    from nnunetv2_versemi.training.nnunet_variants import nnUNetTrainer_foreground67

    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(v, str(tmp_path / v))
    table = tiny_table()
    plain, ours = (cls(tiny_plans(table), CONFIGURATION, 0, tiny_dataset_json(table), device=torch.device("cpu"))
                   for cls in (nnUNetTrainer, nnUNetTrainer_foreground67))  # nnU-Net pops keys of the plans
    assert (plain.oversample_foreground_percent, ours.oversample_foreground_percent) == (0.33, 0.67)
    assert plain.num_iterations_per_epoch == ours.num_iterations_per_epoch and plain.num_epochs == ours.num_epochs
    m = method_by_name("g")
    assert m.trainer == "nnUNetTrainer_foreground67" and m.per_task and not m.prompted and not m.unlabeled
