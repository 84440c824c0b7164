"""Interrupted merges: SIGINT or SIGKILL in the middle of writing the union, then a re-run, gives exactly the
files of an uninterrupted merge, and nothing half-written is left in nnUNet_raw."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import _synth as S  # tests/ is on sys.path (pyproject.toml: pytest's pythonpath)

ARGS = ["-d", "501", "502", "503", "-o", "600", "--labeled-fraction", "0.5", "-np", "1", "--no-pbar"]
# the merge CLI in a child process whose case writer waits after each case, so the signal lands mid-write
DRIVER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a job started in the background ignores SIGINT
from nnunetv2_versemi.data import merge as M
write = M._write_case
def slow(job):
    write(job)
    time.sleep(0.3)
M._write_case = slow
from nnunetv2_versemi.entrypoints.data import merge_main
merge_main(sys.argv[1:])
"""


@pytest.fixture
def raw(tmp_path, monkeypatch):
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / v).mkdir()
        monkeypatch.setenv(v, str(tmp_path / v))
    raw = str(tmp_path / "nnUNet_raw")
    S.make_three(raw, n_train=(6, 6, 6), n_unlabeled=(2, 2, 2), n_test=(1, 1, 1))
    return raw


def _merge(env=None) -> None:
    subprocess.run([sys.executable, "-c", DRIVER.replace("time.sleep(0.3)", "pass"), *ARGS], check=True,
                   env=env or dict(os.environ), capture_output=True, timeout=300)


def _interrupted(raw: str, sig: int) -> subprocess.Popen:
    """Start a slow merge, wait until the temporary union holds some written cases, send ``sig``."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        tmp = [d for d in os.listdir(raw) if d.startswith(".Dataset600_") and ".tmp-" in d]
        if tmp and len(os.listdir(os.path.join(raw, tmp[0], "imagesTr"))) >= 3:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the merge never reached its writing pass")
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_merge_then_rerun_equals_uninterrupted(raw, sig):
    _merge()
    target = os.path.join(raw, "Dataset600_VerSemiUnion")
    reference = S.tree_hash(target)
    shutil.rmtree(target)
    sources = {d: S.tree_hash(os.path.join(raw, d)) for d in os.listdir(raw)}

    proc = _interrupted(raw, sig)
    assert proc.returncode != 0
    assert not os.path.exists(target), "an interrupted merge must not leave a union behind"
    left = [d for d in os.listdir(raw) if d.startswith(".")]
    if sig == signal.SIGINT:
        assert left == [], f"SIGINT must clean up its temporary folder, left {left}"
    else:
        # a killed process cannot clean up: its temporary and its lock file (no longer locked) stay
        assert sorted(left) == [".Dataset600.lock", *[d for d in left if ".tmp-" in d]] and len(left) == 2, left

    _merge()
    assert S.tree_hash(target) == reference
    assert [d for d in os.listdir(raw) if d.startswith(".")] == []  # the killed merge's temporary is gone
    assert {d: S.tree_hash(os.path.join(raw, d)) for d in sources} == sources


PREP = ["-d", "600", "-c", "2d", "-np", "1", "-npfp", "1", "--no_pbar"]
# the unlabeled step in a child process that waits after each case, so the signal lands mid-step
PREP_DRIVER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a job started in the background ignores SIGINT
from nnunetv2_versemi.data import preprocess as P
one = P._preprocess_unlabeled_case
def slow(args):
    out = one(args)
    time.sleep(0.5)
    return out
P._preprocess_unlabeled_case = slow
from nnunetv2_versemi.entrypoints.data import plan_and_preprocess_main
plan_and_preprocess_main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_unlabeled_preprocessing_is_refused_then_finished(raw, sig):
    """plan_and_preprocess killed in its unlabeled step: training refuses the partial set (it names the missing
    cases), and --only-unlabeled, as the error says, gives files identical to an uninterrupted run."""
    from nnunetv2_versemi.data.preprocess import missing_unlabeled, unlabeled_folder
    from nnunetv2_versemi.tasktable import TaskTable

    _merge()
    pp = os.path.join(os.path.dirname(raw), "nnUNet_preprocessed", "Dataset600_VerSemiUnion")
    subprocess.run([sys.executable, "-c", PREP_DRIVER.replace("time.sleep(0.5)", "pass"), *PREP], check=True,
                   capture_output=True, timeout=600)
    folder = unlabeled_folder(pp, "nnUNetPlans_2d")
    reference = S.tree_hash(folder)
    assert len(reference) >= 6
    shutil.rmtree(folder)  # as on a first run: the signal must land in the step, not before it

    proc = subprocess.Popen([sys.executable, "-c", PREP_DRIVER, *PREP, "--only-unlabeled"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.isdir(folder) and len(os.listdir(folder)) >= 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    import json

    with open(os.path.join(pp, "nnUNetPlans.json")) as f:
        table = TaskTable.from_plans(json.load(f))
    assert missing_unlabeled(pp, "nnUNetPlans_2d", table), "the interrupted step left a complete set?"

    subprocess.run([sys.executable, "-c", PREP_DRIVER.replace("time.sleep(0.5)", "pass"), *PREP,
                    "--only-unlabeled"], check=True, capture_output=True, timeout=600)
    assert S.tree_hash(folder) == reference


def _start_merge(extra=()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, *ARGS, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_merges_into_one_id_exactly_one_wins(raw):
    """Two merges into one id: the second, started while the first writes, is refused naming the first's PID,
    the first's union is intact, and a third without --overwrite is refused too (the issue: both exited 0
    and the second silently replaced the first)."""
    _merge()
    target = os.path.join(raw, "Dataset600_VerSemiUnion")
    reference = S.tree_hash(target)
    shutil.rmtree(target)

    first = _start_merge()
    lock = os.path.join(raw, ".Dataset600.lock")
    deadline = time.time() + 120
    while not (os.path.isfile(lock) and open(lock).read().strip()) and time.time() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = _start_merge()
    out2, err2 = second.communicate(timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2, (out2, err2)
    assert f"is being written by process {first.pid}" in err2 and "Traceback" not in err2, err2
    assert S.tree_hash(target) == reference
    assert [d for d in os.listdir(raw) if d.startswith(".")] == []

    third = _start_merge()
    _, err3 = third.communicate(timeout=300)
    assert third.returncode == 2 and "already exists (use --overwrite" in err3, err3
    assert S.tree_hash(target) == reference


def test_two_merges_started_together_exactly_one_wins(raw):
    _merge()
    target = os.path.join(raw, "Dataset600_VerSemiUnion")
    reference = S.tree_hash(target)
    shutil.rmtree(target)
    procs = [_start_merge(), _start_merge()]
    results = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
    codes = sorted(r[3] for r in results)
    assert codes == [0, 2], results
    winner = next(r for r in results if r[3] == 0)
    loser = next(r for r in results if r[3] == 2)
    assert (f"is being written by process {winner[0]}" in loser[2]
            or "already exists (use --overwrite" in loser[2]), loser[2]
    assert S.tree_hash(target) == reference
    assert [d for d in os.listdir(raw) if d.startswith(".")] == []


KEEP_TEMPORARY = """
import sys, time
from nnunetv2_versemi.writers import make_temporary_beside
print(make_temporary_beside(sys.argv[1], "predict"), flush=True)
time.sleep(600)
"""


def test_killed_predict_temporary_removed_by_the_next_run(tmp_path):
    """``nnUNetv2_versemi_predict`` writes into ``.versemi_predict_PID_*`` beside -o: killed with SIGKILL it
    leaves it; the next run (the same function) removes it before making its own."""
    from nnunetv2_versemi.writers import make_temporary_beside

    target = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-c", KEEP_TEMPORARY, target], stdout=subprocess.PIPE, text=True)
    left = proc.stdout.readline().strip()
    assert os.path.isdir(left) and os.path.basename(left).startswith(f".versemi_predict_{proc.pid}_")
    proc.kill()
    proc.wait(timeout=60)
    assert os.path.isdir(left)  # a killed process cannot clean up
    mine = make_temporary_beside(target, "predict")
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(mine)]
