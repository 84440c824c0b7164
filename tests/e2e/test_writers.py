"""One writer per dataset, stale locks and temporaries, symlinked targets; the name rules; the geometry check
and its escape hatch; the --task auto warning."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_versemi import names
from nnunetv2_versemi.writers import WriterLockError, dataset_lock, make_temporary_beside, move_into_place

import _synth as S  # tests/ is on sys.path (pyproject.toml: pytest's pythonpath)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    with dataset_lock(str(tmp_path), 950):
        assert open(tmp_path / ".Dataset950.lock").read().strip() == str(os.getpid())
        with pytest.raises(WriterLockError, match=rf"Dataset id 950 .* is being written by process {os.getpid()}"):
            with dataset_lock(str(tmp_path), 950):
                pass
        with dataset_lock(str(tmp_path), 951):  # another id is another writer
            pass
    assert os.listdir(tmp_path) == []  # released: the lock file is gone


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / ".Dataset950.lock").write_text(f"{_dead_pid()}\n")  # left by a kill -9
    with dataset_lock(str(tmp_path), 950) as path:
        assert open(path).read().strip() == str(os.getpid())
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    for d in (f".Dataset600_U.tmp-{dead}", f".Dataset600_U.old-{dead}", f".versemi_predict_{dead}_x1",
              f".versemi_predict_{live}_x2", f".Dataset600_U.tmp-{live}", "Dataset600_U", ".hidden"):
        (tmp_path / d).mkdir()
    mine = make_temporary_beside(str(tmp_path / "Dataset601_V"))
    assert sorted(os.listdir(tmp_path)) == sorted([f".versemi_predict_{live}_x2", f".Dataset600_U.tmp-{live}",
                                                   "Dataset600_U", ".hidden", os.path.basename(mine)])
    assert os.path.basename(mine) == f".Dataset601_V.tmp-{live}"


def test_move_into_place_needs_overwrite_at_the_rename(tmp_path):
    target = tmp_path / "Dataset600_U"
    tmp = make_temporary_beside(str(target))
    (target).mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        move_into_place(tmp, str(target), overwrite=False)
    assert (target / "old.txt").read_text() == "old"
    (tmp_path / tmp / "new.txt").write_text("new")
    move_into_place(tmp, str(target), overwrite=True)
    assert os.listdir(target) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["Dataset600_U"]


def test_overwrite_through_a_symlinked_union_leaves_no_debris(tmp_path, monkeypatch):
    """``--overwrite`` of a union folder that is a symlink: the folder it points at is replaced, the link
    stays, and neither folder keeps a temporary or ``.old-PID`` entry (it died half-way before)."""
    from nnunetv2_versemi.data import merge as M
    from nnunetv2_versemi.data import normalization as N

    S.isolated_nnunet(tmp_path, monkeypatch)
    monkeypatch.setattr(N, "NNUNET_FOREGROUND_SAMPLES", 2e5)
    raw, elsewhere = tmp_path / "nnUNet_raw", tmp_path / "big_disk"
    S.make_three(str(raw))
    M.merge_datasets([501, 502, 503], 600, num_processes=1, progress=False)
    reference = S.tree_hash(str(raw / "Dataset600_VerSemiUnion"))
    elsewhere.mkdir()
    os.rename(raw / "Dataset600_VerSemiUnion", elsewhere / "union")
    os.symlink(elsewhere / "union", raw / "Dataset600_VerSemiUnion")
    (elsewhere / "union" / "stale.txt").write_text("from the old union")
    M.merge_datasets([501, 502, 503], 600, overwrite=True, num_processes=1, progress=False)
    assert os.path.islink(raw / "Dataset600_VerSemiUnion")
    assert S.tree_hash(str(elsewhere / "union")) == reference
    assert [d for d in os.listdir(raw) if d.startswith(".")] == []
    assert os.listdir(elsewhere) == ["union"]


@pytest.mark.parametrize("name, ok", [("Liver", True), ("Kid-ney2", True), ("Kid_ney", False), ("all", False),
                                      ("AUTO", False), ("../x", False), ("", False)])
def test_task_name_rule(name, ok):
    assert (names.task_name_problem(name) is None) is ok


@pytest.mark.parametrize("value, ok", [(0, True), (999, True), (-5, False), (1000, False), ("950", False),
                                       (True, False)])
def test_dataset_id_rule(value, ok):
    assert (names.dataset_id_problem(value) is None) is ok


@pytest.mark.parametrize("name, ok", [("VerSemiUnion", True), ("VSBench950_LA", True), ("../../x", False),
                                      ("a/b", False), ("-x", False), (".hidden", False)])
def test_dataset_name_rule(name, ok):
    assert (names.dataset_name_problem(name) is None) is ok


# ---- --task auto: a warning relative to chance and to the runner-up -------------------------------------------
@pytest.mark.parametrize("scores, warn", [
    ([0.503, 0.497], True),  # two tasks: a coin flip
    ([0.65, 0.35], False),
    ([0.55, 0.45], True),
    ([0.45, 0.2, 0.2, 0.15], False),  # four tasks: 0.45 is far above chance (0.25) and the runner-up
    ([0.40, 0.35, 0.25], True),  # close to the runner-up
    ([1.0], False),
])
def test_recognition_doubt(scores, warn):
    from nnunetv2_versemi.inference.predict import recognition_doubt

    task_names = ["LungCT", "BrainMR", "Liver", "Heart"][: len(scores)]
    msg = recognition_doubt("case_007", np.array(scores), task_names)
    assert (msg is not None) is warn
    if warn:
        assert "case_007" in msg and task_names[0] in msg and task_names[1] in msg, msg
        assert f"{scores[0]:.3f}" in msg and f"{scores[1]:.3f}" in msg and f"chance {1 / len(scores):.3f}" in msg


# ---- evaluation: geometry within float noise passes; the escape hatch resamples ---------------------------------
def _write(path, arr, origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.0))
    img.SetOrigin(origin)
    img.SetDirection([float(d) for d in direction])
    sitk.WriteImage(img, str(path))


def _eval(tmp_path, pred_kw, **kw):
    from nnunetv2_versemi.evaluation.evaluate import evaluate_folders
    from nnunetv2_versemi.tasktable import Task, TaskLabel, TaskTable

    table = TaskTable(tasks=[Task(name="CT", source_dataset="Dataset901_CT", channel_names={"0": "CT"},
                                  labels=[TaskLabel("organ", 1, 1)], labeled=["CT_a"], test=["CT_t"])])
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    a = np.zeros((6, 8, 8), np.uint8)
    a[2:4, 2:6, 1:4] = 1  # not mirror-symmetric along x
    _write(ref / "CT_t.nii.gz", a)
    arr = pred_kw.pop("arr", a)
    _write(pred / "CT_t.nii.gz", arr, **pred_kw)
    return evaluate_folders(ref, pred, table, **kw)


def test_geometry_float_noise_is_accepted(tmp_path):
    res = _eval(tmp_path, dict(origin=(1e-5, -1e-5, 0.0), direction=(1, 1e-6, 0, 0, 1, 0, 0, 0, 1)))
    assert res["cases"]["CT_t"]["metrics"]["organ"]["dice"] == 1.0 and res["resampled"] == []


def test_allow_geometry_mismatch_resamples_a_flipped_prediction(tmp_path):
    # the same labels stored mirrored along x, with the direction mirrored too: physically identical
    a = np.zeros((6, 8, 8), np.uint8)
    a[2:4, 2:6, 1:4] = 1
    res = _eval(tmp_path, dict(arr=a[:, :, ::-1].copy(), origin=(7.0, 0.0, 0.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)),
                allow_geometry_mismatch=True)
    assert res["cases"]["CT_t"]["metrics"]["organ"]["dice"] == 1.0
    assert res["resampled"] == ["CT_t"] and "origin" in res["cases"]["CT_t"]["resampled"]


def test_allow_geometry_mismatch_scores_a_shifted_prediction_as_missed(tmp_path):
    res = _eval(tmp_path, dict(origin=(100.0, 0.0, 0.0)), allow_geometry_mismatch=True)
    assert res["cases"]["CT_t"]["metrics"]["organ"]["dice"] == 0.0  # 100 mm away: no overlap, not Dice 1


def test_add_task_takes_the_dataset_lock(tmp_path, monkeypatch):
    """A second writer of the output id is refused by add_task as by merge, before anything is read or written."""
    from nnunetv2_versemi.data.add_task import add_tasks

    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    model = object()  # never looked at: the lock comes first
    with dataset_lock(str(tmp_path), 950):
        with pytest.raises(WriterLockError, match=rf"Dataset id 950 .* is being written by process {os.getpid()}"):
            add_tasks(model, ["Dataset001_New"], 950, progress=False)
        assert os.listdir(tmp_path) == [".Dataset950.lock"]
    assert os.listdir(tmp_path) == []
