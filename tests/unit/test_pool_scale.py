"""The pool-scale benchmark's measurements and verdicts (the full run is a benchmark, docs/BENCHMARKS.md)."""

import multiprocessing
import os
import sys
import time

import pytest

from nnunetv2_versemi.benchmark import pool_scale
from nnunetv2_versemi.entrypoints.benchmark import pool_main

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="/proc is Linux-only")


def _hold_memory(mib: int, seconds: float) -> None:
    block = bytearray(mib * 2**20)
    for i in range(0, len(block), 4096):  # touch every page, so it is resident
        block[i] = 1
    time.sleep(seconds)


def test_tree_rss_counts_children():
    alone = pool_scale.tree_rss()
    child = multiprocessing.get_context("fork").Process(target=_hold_memory, args=(200, 3.0))
    child.start()
    try:
        deadline = time.time() + 2.5
        with_child = alone
        while time.time() < deadline:
            with_child = max(with_child, pool_scale.tree_rss())
            time.sleep(0.05)
    finally:
        child.join()
    # the child holds 200 MiB of its own on top of what it shares with this process
    assert with_child - alone > 150 * 2**20
    assert pool_scale.tree_rss(child.pid if child.is_alive() else os.getpid()) > 0


def test_peak_sampler_sees_a_short_allocation():
    with pool_scale.TreeRssPeak(interval=0.01) as peak:
        start = pool_scale.tree_rss()
        _hold_memory(100, 0.3)
    assert peak.peak - start > 80 * 2**20


def _row(size, merge, pre, startup, rss, step=0.1):
    return {"size": size, "merge_s": merge, "preprocess_unlabeled_s": pre, "startup_s": startup,
            "peak_rss_mib": rss, "step_s_median": step, "step_s_all": [step] * 10}


def test_linear_rate_and_verdicts():
    rows = [_row(100, 1.1, 2.0, 10.0, 1000.0), _row(1000, 2.0, 11.0, 12.0, 1050.0),
            _row(10000, 11.0, 101.0, 30.0, 1300.0)]
    rate = pool_scale.linear_rate(rows, "preprocess_unlabeled_s")
    assert rate["ms_per_case"] == pytest.approx(10.0, rel=1e-6)
    assert rate["fixed_s"] == pytest.approx(1.0, rel=1e-6)
    assert rate["max_rel_deviation"] == pytest.approx(0.0, abs=1e-9)
    quadratic = [_row(n, 1e-6 * n * n + 1, 1, 1, 1) for n in (100, 1000, 10000)]
    assert pool_scale.linear_rate(quadratic, "merge_s")["max_rel_deviation"] > 0.3
    aims = {a["key"]: a for a in pool_scale.assess(rows)}
    assert aims["startup_s"]["ratio"] == pytest.approx(3.0) and not aims["startup_s"]["met"]
    assert aims["peak_rss_mib"]["ratio"] == pytest.approx(1.3) and not aims["peak_rss_mib"]["met"]
    rows[-1].update(startup_s=19.0, peak_rss_mib=1150.0)
    assert all(a["met"] for a in pool_scale.assess(rows))
    result = {"command": "c", "machine": "m", "rows": rows, "aims": pool_scale.assess(rows),
              "rates": {"merge_s": pool_scale.linear_rate(rows, "merge_s")}}
    text = pool_scale.markdown(result)
    assert "| 10000 | 11.0 | 101.0 | 19.0 | 1150 | 0.100 |" in text
    assert "trainer start-up: 19.00 against 10.00, 1.90x (aim <= 2.0x): met" in text


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        pool_main(["-o", str(out), "--sizes", "1000", "100"])
    assert e.value.code == 2
    assert "increasing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pool_main(["-o", str(out), "--steps", "3"])
    assert not out.exists()


def test_probe_usage_message():
    import subprocess

    r = subprocess.run([sys.executable, "-m", "nnunetv2_versemi.benchmark.pool_scale"], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "--probe DATASET" in r.stderr


def test_plot_writes_the_figure_from_the_result_rows(tmp_path):
    rows = [{"size": n, "merge_s": 1.0 + n / 100, "preprocess_unlabeled_s": 2.0 + n / 50, "startup_s": 2.0,
             "peak_rss_mib": 2800.0, "step_s_all": [0.15 + 0.001 * i for i in range(12)]} for n in (100, 1000)]
    path = tmp_path / "pool_scale.png"
    pool_scale.plot({"rows": rows}, str(path))
    assert path.stat().st_size > 10_000
