"""A benchmark rerun refuses checkpoints trained with another VerSemi config than their trainer has now (a default
that changed between two invocations), before anything trains; old checkpoints without a field count with the value
their version trained with."""

from __future__ import annotations

from dataclasses import replace
from os.path import join
from types import SimpleNamespace

import pytest
import torch

from nnunetv2_versemi.benchmark.comparison import check_trained_configs
from nnunetv2_versemi.benchmark.methods import BenchmarkError
from nnunetv2_versemi.training.config import DEFAULT, VerSemiConfig


def _run(tmp_path, trainer: str, config: dict | None, checkpoint: str = "checkpoint_final.pth"):
    folder = tmp_path / trainer
    (folder / "fold_all").mkdir(parents=True)
    torch.save({"versemi": {"config": config}} if config is not None else {}, folder / "fold_all" / checkpoint)
    return SimpleNamespace(trainer=trainer, folds=["all"], model_folder=lambda: str(folder))


def test_same_config_passes_and_plain_nnunet_is_not_checked(tmp_path):
    check_trained_configs([_run(tmp_path, "VerSemiTrainer", DEFAULT.to_dict()),
                           _run(tmp_path, "nnUNetTrainer", None)])


@pytest.mark.parametrize("checkpoint", ["checkpoint_final.pth", "checkpoint_latest.pth"])
def test_other_config_is_refused_naming_the_checkpoint_and_the_fields(tmp_path, checkpoint):
    run = _run(tmp_path, "VerSemiTrainer", replace(DEFAULT, sup_finish_fraction=0.0).to_dict(), checkpoint)
    with pytest.raises(BenchmarkError) as e:
        check_trained_configs([run])
    assert join(run.model_folder(), "fold_all", checkpoint) in str(e.value)
    assert "'sup_finish_fraction': 0.0" in str(e.value) and "'sup_finish_fraction': 0.4" in str(e.value)


def test_a_checkpoint_from_before_the_closing_phase_counts_as_trained_without_it(tmp_path):
    old = {k: v for k, v in DEFAULT.to_dict().items() if k != "sup_finish_fraction"}
    assert VerSemiConfig.from_dict(old).sup_finish_fraction == 0.0
    with pytest.raises(BenchmarkError, match="sup_finish_fraction"):
        check_trained_configs([_run(tmp_path, "VerSemiTrainer", old)])
    check_trained_configs([_run(tmp_path / "b", "VerSemiTrainer_noSupFinish", old)])
