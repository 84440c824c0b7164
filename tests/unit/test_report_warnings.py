"""The benchmark report carries the WARNING lines of each run's nnU-Net training logs."""
from nnunetv2_versemi.benchmark.report import _warnings_section, training_warnings


def test_training_log_warnings_reach_the_report(tmp_path):
    fold = tmp_path / "fold_all"
    fold.mkdir()
    dead = "WARNING: Lung: online pseudo Dice 0 in each of the last 3 epochs with a value."
    (fold / "training_log_2026_12_7_10_00_00.txt").write_text(
        "2026-12-07 10:00:00.000001: Epoch 0\n"
        "2026-12-07 10:05:00.000001: VerSemi: unlabeled terms on from epoch 10 (step 500): epoch limit\n"
        f"2026-12-07 10:09:00.000001: {dead}\n")
    # a resumed run writes a second log; its repeat of the same warning is listed once, a new one is added
    (fold / "training_log_2026_12_7_11_00_00.txt").write_text(
        f"2026-12-07 11:09:00.000001: {dead}\n2026-12-07 11:09:01.000001: WARNING: P_agg has been (almost) empty\n")
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_0" / "training_log_2026_12_7_10_00_00.txt").write_text("2026-12-07 10:00:00.000001: Epoch 0\n")

    found = training_warnings(str(tmp_path), ["all", 0, 1])
    assert found == {"all": [dead, "WARNING: P_agg has been (almost) empty"]}  # fold 0: none; fold 1: no log

    lines = _warnings_section({"training_warnings": {"VerSemiTrainer": found}})
    assert "## Warnings in the training logs" in lines
    assert f"- VerSemiTrainer, fold all: {dead}" in lines
    assert _warnings_section({"training_warnings": {}}) == [] and _warnings_section({}) == []
