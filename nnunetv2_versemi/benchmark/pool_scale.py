"""``nnUNetv2_versemi_benchmark pool``: how the pipeline scales with the size of the unlabeled pool.

For every pool size N a demo union (the ``demo`` preset's three tasks at a small ``--scale``, a fixed number of
labeled cases, about N / 3 unlabeled images per task) is generated, merged, planned and preprocessed in a scratch
nnU-Net tree of its own, and a VerSemi trainer trains ``--steps`` steps on it in a fresh process. Measured per N:
merge time, the unlabeled preprocessing step alone (``--only-unlabeled``, rate per case), trainer start-up (from
the trainer's construction to its first batches, as ``nnUNetv2_train`` does it), peak resident set size of the
training process and its data-augmentation workers together, and the step time (data wait included) with the
unlabeled terms on. Every stage runs in a subprocess, since nnU-Net reads its folders from the environment at
import.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from os.path import join

PROG = "nnUNetv2_versemi_benchmark pool"
UNION_ID = 950
FIRST_TASK_ID = 901


# ------------------------------------------------------------------------------------- memory of a tree
def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:  # the process ended between listing and reading
        pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss(pid: int | None = None) -> int:
    """Resident set size (bytes) of a process and all its descendants (Linux /proc)."""
    todo, total = [os.getpid() if pid is None else pid], 0
    while todo:
        p = todo.pop()
        total += _rss(p)
        todo += _children(p)
    return total


class TreeRssPeak:
    """Peak :func:`tree_rss` of this process while the ``with`` block runs, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRssPeak:
        if not os.path.isdir("/proc/self/task"):
            raise RuntimeError(f"{PROG} measures memory through /proc (Linux only)")
        self.peak = tree_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss())


# ------------------------------------------------------------------------------------------- the stages
def _env(root: str, n_proc_da: int) -> dict:
    env = dict(os.environ)
    env.update(nnUNet_raw=join(root, "raw"), nnUNet_preprocessed=join(root, "preprocessed"),
               nnUNet_results=join(root, "results"), nnUNet_n_proc_DA=str(n_proc_da), nnUNet_compile="false")
    return env


def _timed(cmd: list[str], env: dict, log_file: str) -> float:
    t0 = time.perf_counter()
    with open(log_file, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"'{' '.join(cmd)}' failed with exit code {rc}; see {log_file}")
    return time.perf_counter() - t0


def _module(entry: str, *args: str) -> list[str]:
    mod, fn = entry.split(":")
    return [sys.executable, "-c", f"from {mod} import {fn}; {fn}()", *args]


def measure_size(out_dir: str, size: int, steps: int, np_: int, scale: float, labeled: int, n_proc_da: int,
                 trainer: str, log) -> dict:
    """Every measurement of one pool size (a scratch nnU-Net tree under ``out_dir/pool<size>``)."""
    root = join(out_dir, f"pool{size}")
    os.makedirs(root, exist_ok=True)
    env, log_file = _env(root, n_proc_da), join(root, "stages.log")
    per_task = math.ceil(size / 3)
    data = "nnunetv2_versemi.entrypoints.data:"
    row = {"size": 3 * per_task, "unlabeled_per_task": per_task}
    tasks = [str(FIRST_TASK_ID + i) for i in range(3)]
    log(f"pool {row['size']}: generating the demo tasks")
    row["generate_s"] = _timed(_module(data + "demo_data_main", "--preset", "demo", "--num-labeled", str(labeled),
                                       "--num-unlabeled", str(per_task), "--num-test", "0", "--scale", str(scale),
                                       "--overwrite"), env, log_file)
    log(f"pool {row['size']}: merging")
    row["merge_s"] = _timed(_module(data + "merge_main", "-d", *tasks, "-o", str(UNION_ID), "-n", "Pool",
                                    "--labeled-fraction", "1", "-np", str(np_), "--no-pbar", "--overwrite"),
                            env, log_file)
    log(f"pool {row['size']}: planning and preprocessing (2d)")
    row["plan_and_preprocess_s"] = _timed(_module(data + "plan_and_preprocess_main", "-d", str(UNION_ID), "-c", "2d",
                                                  "-np", str(np_), "-npfp", str(np_), "--no_pbar"), env, log_file)
    log(f"pool {row['size']}: the unlabeled preprocessing step alone")
    row["preprocess_unlabeled_s"] = _timed(_module(data + "plan_and_preprocess_main", "-d", str(UNION_ID), "-c",
                                                   "2d", "-np", str(np_), "--only-unlabeled", "--no_pbar"),
                                           env, log_file)
    _timed(_module("nnunetv2_versemi.entrypoints.presets:presets_main", "-d", str(UNION_ID), "--preset",
                   "cpu_demo"), env, log_file)
    log(f"pool {row['size']}: trainer start-up and {steps} steps (fresh process)")
    probe = join(root, "probe.json")
    _timed([sys.executable, "-m", "nnunetv2_versemi.benchmark.pool_scale", "--probe", str(UNION_ID), "2d_cpu",
            trainer, str(steps), probe], env, log_file)
    with open(probe) as f:
        row.update(json.load(f))
    row["merge_ms_per_case"] = 1000 * row["merge_s"] / row["size"]
    row["preprocess_unlabeled_ms_per_case"] = 1000 * row["preprocess_unlabeled_s"] / row["size"]
    log(f"pool {row['size']}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float)))
    return row


def probe_trainer(dataset: str, configuration: str, trainer_name: str, steps: int) -> dict:
    """In a fresh process: start-up time of ``trainer_name`` on fold all (construction, initialisation, the data
    loaders' first batches), then ``steps`` training steps in stage 2 (the unlabeled terms on), timed with their
    data wait, under the peak RSS of this process and its workers."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_versemi.discovery import ensure_ext_trainer_env

    ensure_ext_trainer_env()
    torch.set_num_threads(1)
    rss_before = tree_rss()
    t0 = time.perf_counter()
    trainer = get_trainer_from_args(dataset, configuration, "all", trainer_name, "nnUNetPlans",
                                    device=torch.device("cpu"))
    trainer.on_train_start()
    startup = time.perf_counter() - t0
    trainer.switch_epoch = 0  # stage 2 from the first step: the unlabeled pool is read every step
    if not trainer.unlabeled_weight() > 0:
        raise RuntimeError(f"{trainer_name} would not read the unlabeled pool (lambda = 0)")
    times = []
    with TreeRssPeak() as peak:
        for _ in range(steps):
            t = time.perf_counter()
            trainer.train_step(next(trainer.dataloader_train))
            times.append(time.perf_counter() - t)
    for loader in (trainer.dataloader_train, trainer.dataloader_val, trainer.dataloader_unlabeled):
        if hasattr(loader, "_finish"):
            loader._finish()
    warm = times[min(5, len(times) - 1):]
    return {"startup_s": startup, "rss_before_mib": rss_before / 2**20, "peak_rss_mib": peak.peak / 2**20,
            "step_s_median": statistics.median(warm), "step_s_mean": statistics.fmean(warm),
            "step_s_all": times, "num_unlabeled_loaded": len(trainer.dataloader_unlabeled.generator.indices)
            if hasattr(getattr(trainer.dataloader_unlabeled, "generator", None), "indices") else None}


# --------------------------------------------------------------------------------------------- the report
AIMS = (("startup_s", 2.0, "trainer start-up"), ("peak_rss_mib", 1.2, "peak RSS during training"))


def assess(rows: list[dict]) -> list[dict]:
    """Each aim of the largest pool against the smallest: ratio, limit, met."""
    small, large = rows[0], rows[-1]
    out = [{"what": what, "key": key, "small": small[key], "large": large[key], "ratio": large[key] / small[key],
            "limit": limit, "met": large[key] / small[key] <= limit} for key, limit, what in AIMS]
    return out


def linear_rate(rows: list[dict], key: str) -> dict:
    """Least-squares seconds per case of ``key`` over the pool sizes, and the largest relative deviation of a
    size's time from the fitted line (0: exactly linear)."""
    xs, ys = [r["size"] for r in rows], [r[key] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    icpt = my - slope * mx
    dev = max(abs(y - (icpt + slope * x)) / y for x, y in zip(xs, ys)) if sxx else float("nan")
    return {"ms_per_case": 1000 * slope, "fixed_s": icpt, "max_rel_deviation": dev}


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# Unlabeled pool scale ({result['machine']})", "", f"- command: `{result['command']}`", "",
             "| unlabeled images | merge (s) | unlabeled preprocessing (s) | trainer start-up (s) | peak RSS (MiB) | "
             "step (s, median) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['merge_s']:.1f} | {r['preprocess_unlabeled_s']:.1f} | {r['startup_s']:.1f} "
                     f"| {r['peak_rss_mib']:.0f} | {r['step_s_median']:.3f} |")
    lines += ["", "Rates (least squares over the sizes):", ""]
    for key, rate in result["rates"].items():
        lines.append(f"- {key}: {rate['ms_per_case']:.2f} ms per case + {rate['fixed_s']:.1f} s fixed (largest "
                     f"deviation from the line {100 * rate['max_rel_deviation']:.0f} %)")
    lines += ["", f"Aims ({rows[-1]['size']} against {rows[0]['size']} unlabeled images):", ""]
    for a in result["aims"]:
        lines.append(f"- {a['what']}: {a['large']:.2f} against {a['small']:.2f}, {a['ratio']:.2f}x "
                     f"(aim <= {a['limit']}x): {'met' if a['met'] else 'missed'}")
    s0, s1 = rows[0]["step_s_all"], rows[-1]["step_s_all"]
    lines.append(f"- step time: median {rows[-1]['step_s_median']:.3f} s against {rows[0]['step_s_median']:.3f} s "
                 f"(spread over steps of the smaller pool: {min(s0):.3f}-{max(s0):.3f} s; larger: "
                 f"{min(s1):.3f}-{max(s1):.3f} s)")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n = [r["size"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for key, label in (("merge_s", "merge"), ("preprocess_unlabeled_s", "unlabeled preprocessing"),
                       ("startup_s", "trainer start-up")):
        axes[0].plot(n, [r[key] for r in rows], "o-", label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="unlabeled images", ylabel="seconds", title="time")
    axes[0].legend(fontsize=8)
    axes[1].plot(n, [r["peak_rss_mib"] for r in rows], "o-")
    axes[1].set(xscale="log", xlabel="unlabeled images", ylabel="MiB", title="peak RSS, trainer + workers",
                ylim=(0, 1.15 * max(r["peak_rss_mib"] for r in rows)))
    axes[2].boxplot([r["step_s_all"][5:] for r in rows])
    axes[2].set_xticks(range(1, len(n) + 1), [str(x) for x in n])
    axes[2].set(xlabel="unlabeled images", ylabel="seconds", title="training step (stage 2)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_pool_scale(out_dir: str, sizes: list[int], steps: int = 50, np_: int = 2, scale: float = 0.5,
                   labeled: int = 4, n_proc_da: int = 1, trainer: str = "VerSemiTrainer", command: str = "",
                   log=print) -> dict:
    """Measure every pool size (smallest first), write ``pool_scale.json``, ``.md`` and ``.png`` to ``out_dir``."""
    import platform

    if len(sizes) < 2 or sorted(sizes) != list(sizes) or sizes[0] < 3:
        raise ValueError(f"--sizes must be at least two increasing pool sizes of 3 or more, got {sizes}")
    os.makedirs(out_dir, exist_ok=True)
    rows = [measure_size(out_dir, n, steps, np_, scale, labeled, n_proc_da, trainer, log) for n in sizes]
    result = {"command": command, "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}",
              "settings": {"steps": steps, "np": np_, "scale": scale, "labeled_per_task": labeled,
                           "nnUNet_n_proc_DA": n_proc_da, "trainer": trainer},
              "rows": rows, "aims": assess(rows),
              "rates": {k: linear_rate(rows, k) for k in ("merge_s", "preprocess_unlabeled_s")}}
    with open(join(out_dir, "pool_scale.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(join(out_dir, "pool_scale.md"), "w") as f:
        f.write(markdown(result))
    plot(result, join(out_dir, "pool_scale.png"))
    return result


if __name__ == "__main__":  # the trainer probe, in a fresh process (see measure_size)
    if len(sys.argv) != 7 or sys.argv[1] != "--probe":
        raise SystemExit("usage: python -m nnunetv2_versemi.benchmark.pool_scale --probe DATASET CONFIGURATION "
                         "TRAINER STEPS OUT_JSON")
    _, _, ds, cfg, tr, n, out = sys.argv
    with open(out, "w") as f:
        json.dump(probe_trainer(ds, cfg, tr, int(n)), f)
