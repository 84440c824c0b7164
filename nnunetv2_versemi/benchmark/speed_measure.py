"""Measurement of :mod:`nnunetv2_versemi.benchmark.speed`: training step times of the contenders (interleaved
rounds after warm-up), their peak memory (CUDA allocation, or resident set growth in a fresh process on CPU),
and sliding-window prediction times."""

from __future__ import annotations

import contextlib
import copy
import itertools
import multiprocessing
import os
import resource
import statistics
import threading
import time
from dataclasses import dataclass

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_versemi.benchmark.speed_inputs import (
    _dataset_json,
    fake_batch,
    fake_table,
    make_trainer,
    scratch_nnunet_env,
)
from nnunetv2_versemi.tasktable import TABLE_KEY, TaskTable
from nnunetv2_versemi.training.trainer import VerSemiTrainer


@dataclass
class Contender:
    name: str
    kind: str  # nnunet | versemi | per_prompt
    num_tasks: int
    trainer: str = "VerSemiTrainer"  # the class of versemi and per_prompt contenders


def _sync(device) -> None:

    if device.type == "cuda":
        torch.cuda.synchronize()


def _prepare(c: Contender, plans: dict, configuration: str, table_for, num_channels: int, device):

    cm = PlansManager(plans).get_configuration(configuration)
    table = table_for(c.num_tasks)
    trainer = make_trainer(c.kind, plans, configuration, table, num_channels, device, c.trainer)
    batch = fake_batch(trainer, table, cm.batch_size, list(cm.patch_size), num_channels, device)
    if c.kind != "nnunet":
        bu = trainer.config.unlabeled_batch_size or cm.batch_size
        u = {"data": torch.randn((bu, num_channels, *cm.patch_size)).to(device),
             "keys": [f"{table.tasks[i % table.num_tasks].name}_u{i:04d}" for i in range(bu)]}
        trainer.dataloader_unlabeled = itertools.repeat(u)
        # the last epoch before the closing phase, after the switch: lambda > 0 under either schedule, so the step
        # runs the unlabeled branch and every CutMix term (stage 2 of the two-stage schedule; the stage-1 step has
        # no unlabeled batch, and the closing phase's step is L_sup alone: both are cheaper)
        trainer.switch_epoch = 0
        trainer.current_epoch = trainer.num_epochs - 1 - trainer.schedule.sup_finish_epochs(trainer.num_epochs)
        if trainer.current_epoch < 0 or trainer.schedule.in_sup_finish(trainer.current_epoch, trainer.num_epochs):
            raise ValueError(f"{c.name}: every epoch is in the closing phase, the VerSemi step never runs its CutMix terms")
        if not trainer.unlabeled_weight() > 0:
            raise ValueError(f"{c.name}: the VerSemi step would skip the unlabeled branch (lambda = 0)")
    return trainer, batch


class RssSampler:
    """Peak resident set size of this process while the ``with`` block runs, sampled from /proc every
    ``interval`` seconds in a thread (torch releases the GIL inside its ops). Where /proc is missing, the
    growth of ``ru_maxrss`` is used instead (which only sees a new all-time peak)."""
    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = self.peak = 0
        self._stop = None

    @staticmethod
    def current() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            v = self.current()
            if v is not None and v > self.peak:
                self.peak = v
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._proc = self.current() is not None
        if self._proc:
            self.baseline = self.peak = self.current()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        else:
            self.baseline = self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self._proc:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.current() or 0)
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


def memory_probe(args: tuple) -> dict:
    """Peak memory growth (MiB) over the resident set before the first step, of ``steps`` training steps of
    one contender on CPU. Run it in a fresh process (what :func:`measure_training` does): memory that an
    earlier contender freed stays in the process and would hide this one's growth."""
    c, plans, configuration, table_spec, num_channels, steps, threads = args
    torch.set_num_threads(threads)
    with scratch_nnunet_env():
        trainer, batch = _prepare(
            c, plans, configuration, _table_factory(table_spec), num_channels, torch.device("cpu")
        )
        with RssSampler() as rss:
            for _ in range(steps):
                trainer.train_step(batch)
    return {"peak_mib": rss.growth_mib}


def _table_factory(spec):
    """``spec``: a task table dict (the dataset's own, used for its task count) or None (fake tables only)."""
    real = TaskTable.from_dict(spec) if spec is not None else None

    def table_for(n: int):
        if real is not None and n == real.num_tasks:
            return real
        return fake_table(n)

    return table_for


def _warm_up(contenders: list[Contender], prepared: dict, warmup: int) -> None:
    """``warmup`` untimed training steps of every contender."""
    for c in contenders:
        tr, batch = prepared[c.name]
        for _ in range(warmup):
            tr.train_step(batch)


def _timed_rounds(contenders: list[Contender], prepared: dict, out: dict, steps: int, device, log) -> None:
    """``steps`` rounds of one timed step per contender, interleaved; appends the times to ``out``."""
    for r in range(steps):
        for c in contenders:
            tr, batch = prepared[c.name]
            _sync(device)
            t0 = time.perf_counter()
            tr.train_step(batch)
            _sync(device)
            out[c.name]["times"].append(time.perf_counter() - t0)
        log(f"round {r + 1}/{steps}: " + ", ".join(f"{k} {v['times'][-1]:.3f}s" for k, v in out.items()))


def _cuda_peak_memory(contenders: list[Contender], prepared: dict, out: dict) -> None:
    """Peak CUDA allocation of one step per contender over the allocation before it, into ``out``."""
    for c in contenders:
        tr, batch = prepared[c.name]
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        tr.train_step(batch)
        torch.cuda.synchronize()
        out[c.name]["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20


def _cpu_peak_memory(
    contenders: list[Contender],
    plans: dict,
    configuration: str,
    table_spec: dict | None,
    num_channels: int,
    warmup: int,
    out: dict,
    log,
) -> None:
    """Peak resident-set growth per contender, each probed by :func:`memory_probe` in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    for c in contenders:
        log(f"memory probe {c.name} (fresh process)")
        with ctx.Pool(1) as pool:
            res = pool.apply(
                memory_probe,
                (
                    (
                        c,
                        plans,
                        configuration,
                        table_spec,
                        num_channels,
                        max(2, warmup),
                        torch.get_num_threads(),
                    ),
                ),
            )
        out[c.name]["peak_mib"] = res["peak_mib"]


def _time_statistics(out: dict) -> None:
    """Median, mean and minimum of each contender's step times, added to its entry."""
    for v in out.values():
        v["median_s"] = statistics.median(v["times"])
        v["mean_s"] = statistics.fmean(v["times"])
        v["min_s"] = min(v["times"])


def measure_training(
    plans: dict,
    configuration: str,
    contenders: list[Contender],
    table_spec: dict | None,
    num_channels: int,
    device,
    warmup: int = 2,
    steps: int = 5,
    memory: bool = True,
    log=print,
) -> dict:
    """Step time (interleaved rounds) and peak memory of each contender; returns {name: {...}}."""
    table_for = _table_factory(table_spec)
    out = {c.name: {"kind": c.kind, "tasks": c.num_tasks, "times": []} for c in contenders}
    with scratch_nnunet_env():
        prepared = {}
        for c in contenders:
            log(f"building {c.name}")
            prepared[c.name] = _prepare(c, plans, configuration, table_for, num_channels, device)
        _warm_up(contenders, prepared, warmup)
        _timed_rounds(contenders, prepared, out, steps, device, log)
        if memory and device.type == "cuda":
            _cuda_peak_memory(contenders, prepared, out)
        del prepared
    if memory and device.type == "cpu":
        _cpu_peak_memory(contenders, plans, configuration, table_spec, num_channels, warmup, out, log)
    _time_statistics(out)
    return out


def measure_prediction(
    plans: dict,
    configuration: str,
    table,
    num_channels: int,
    device,
    image_shape,
    repeats: int = 3,
    tta: bool = False,
    log=print,
) -> dict:
    """Sliding-window time of a plain nnU-Net network vs the VerSemi network (one prompt / all tasks)."""
    plans = copy.deepcopy(plans)
    plans[TABLE_KEY] = table.to_dict()
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    dj = _dataset_json(table, num_channels)
    n_out = table.num_merged_labels
    nets = {
        "nnunet": nnUNetTrainer.build_network_architecture(pm, cm, num_channels, n_out, False),
        "versemi": VerSemiTrainer.build_network_architecture(pm, cm, num_channels, n_out, False),
    }
    predictors = {}
    for k, net in nets.items():
        net = net.to(device).eval()
        p = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=tta,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            allow_tqdm=False,
        )
        p.manual_initialization(
            net, pm, cm, None, dj, "speed", tuple(range(len(cm.patch_size))) if tta else None
        )
        predictors[k] = p
    x = torch.randn((num_channels, *image_shape), generator=torch.Generator().manual_seed(1))
    modes = [("nnunet", "nnunet", None), ("task", "versemi", 0), ("all", "versemi", None)]
    times = {m: [] for m, _, _ in modes}
    with torch.no_grad():
        for r in range(repeats + 1):
            for mode, k, prompt in modes:
                net = predictors[k].network
                with net.prompted(prompt) if k == "versemi" else contextlib.nullcontext():
                    _sync(device)
                    t0 = time.perf_counter()
                    predictors[k].predict_sliding_window_return_logits(x)
                    _sync(device)
                if r > 0:  # the first round warms up
                    times[mode].append(time.perf_counter() - t0)
            if r > 0:
                log(
                    f"prediction round {r}/{repeats}: "
                    + ", ".join(f"{m} {t[-1]:.3f}s" for m, t in times.items())
                )
    return {m: {"times": t, "median_s": statistics.median(t)} for m, t in times.items()}
