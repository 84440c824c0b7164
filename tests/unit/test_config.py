"""The VerSemi config: one frozen object, validated where it is made; every variant is the default with the
changes its row in docs/METHOD.md ("Variants") lists."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from nnunetv2_versemi.training import variants as V
from nnunetv2_versemi.training.config import DEFAULT, VerSemiConfig
from nnunetv2_versemi.training.trainer import VerSemiTrainer

METHOD_MD = Path(__file__).resolve().parents[2] / "docs" / "METHOD.md"
ROW = re.compile(r"^\| `(VerSemiTrainer\w*)` \| (\w+) \| (.*?) \| (.*) \|$")


def _table() -> dict[str, tuple[str, str, str]]:
    text = METHOD_MD.read_text()
    section = text[text.index("## Variants"):]
    section = section[:section.index("\n## ", 1)]
    return {m[1]: (m[2], m[3], m[4]) for m in map(ROW.match, section.splitlines()) if m}


def _classes() -> dict[str, type]:
    return {n: getattr(V, n) for n in V.__all__ if issubclass(getattr(V, n), VerSemiTrainer)}


def test_every_variant_is_the_default_plus_the_changes_its_row_lists():
    table, classes = _table(), _classes()
    assert set(table) == set(classes), (set(table) ^ set(classes))
    for name, cls in classes.items():
        topic, changes, why = table[name]
        listed = re.split(r" \((?:run length|initial learning rate)", changes)[0]
        expected = ", ".join(f"`{k}={v!r}`" for k, v in cls.config.changes().items()) or "none"
        assert listed == expected, name
        assert cls.config == dataclasses.replace(DEFAULT, **cls.config.changes()), name
        assert why.strip(), f"{name}: no reason given"
        if topic == "length":
            assert issubclass(cls, V.ShortRun), name
            assert f"{cls.epochs} epochs" in changes, name
        elif topic == "optimizer":
            assert cls.__bases__ == (V.LearningRate, VerSemiTrainer), name
            assert f"(initial learning rate {cls.lr:g})" in changes, name
        else:
            # an ablation is the default trainer with a config, not a subclass of another ablation
            assert cls.__bases__ == (VerSemiTrainer,) or cls is VerSemiTrainer, name


def test_no_two_ablations_are_the_same_config_except_the_named_aliases():
    seen: dict[VerSemiConfig, str] = {}
    aliases = {("VerSemiTrainer", "VerSemiTrainer_unmixedTeacher"), ("VerSemiTrainer", "VerSemiTrainer_supFinish40")}
    for name, cls in _classes().items():
        if issubclass(cls, (V.ShortRun, V.LearningRate)):
            continue
        if cls.config in seen:
            assert (seen[cls.config], name) in aliases, (seen[cls.config], name)
        seen.setdefault(cls.config, name)


@pytest.mark.parametrize("changes, message", [
    (dict(switch_dice=1.5), "switch_dice must be a number in"),
    (dict(stage1_min_fraction=0.55, stage1_fraction=0.5), "must not exceed stage1_fraction"),
    (dict(sup_finish_fraction=0.9), "leave no epoch for the unlabeled terms"),
    (dict(unsup_min_foreground=-0.1), "unsup_min_foreground must be"),
    (dict(empty_warning_epochs=0), "empty_warning_epochs must be a positive integer"),
    (dict(unsup_aggregate="max"), "unsup_aggregate must be 'source' or 'all'"),
    (dict(pseudo_weight=-1.0), "pseudo_weight must be a number >= 0"),
    (dict(pseudo_threshold=1.0), "pseudo_threshold must be None or a number in"),
    (dict(teacher_input="both"), "teacher_input must be 'unmixed' or 'mixed'"),
    (dict(ema_alpha=1.0), r"ema_alpha must be a number in \[0, 1\)"),
    (dict(ema_alpha="0.99"), "ema_alpha must be a number in"),
    (dict(target_source="teacher"), "target_source must be 'ema' or 'detach' or 'gradient'"),
    (dict(labeled_box_ratio=(0.7, 0.5)), "labeled_box_ratio must be a"),
    (dict(unlabeled_batch_size=0), "unlabeled_batch_size must be a positive integer or None"),
    (dict(static_head=1), "static_head must be True or False"),
    (dict(pseudo_class_balance="yes"), "pseudo_class_balance must be True or False"),
    (dict(foreground_oversampling=1.5), "foreground_oversampling must be None or a number in"),
    (dict(recognition_input="encoder"), "recognition_input must be 'stages' or 'bottleneck'"),
])
def test_invalid_values_fail_where_the_config_is_made(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DEFAULT, **changes)


def test_config_is_frozen_and_survives_the_checkpoint_format():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.pseudo_weight = 0.0
    config = V.VerSemiTrainer_officialMix.config
    assert VerSemiConfig.from_dict(config.to_dict()) == config
    # an older checkpoint lacks fields (and may hold unknown ones): the defaults fill in
    old = {k: v for k, v in DEFAULT.to_dict().items() if k != "recognition_lr"} | {"retired_field": 1}
    assert VerSemiConfig.from_dict(old) == DEFAULT
    assert config.changes() == {"unlabeled_mix": "labeled"}
    assert config.uses_unlabeled and not V.VerSemiTrainer_noUnsup.config.uses_unlabeled
    assert V.VerSemiTrainer_noUnsup.config.changes(V.VerSemiTrainer_supOnly.config) == {
        "syn_weight": 1.0, "spec_weight": 1.0}
