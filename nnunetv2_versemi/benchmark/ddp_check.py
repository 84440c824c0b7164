"""VerSemi training in a DDP group, traced per rank, and the checks of what DDP must keep equal or apart.

``run_ranks(job, world_size, backend)`` starts ``world_size`` processes (``torch.multiprocessing`` spawn), each
building its own process group (``gloo`` on CPU: nnU-Net's ``run_ddp`` hard-codes NCCL) and training the real
trainer named in the job through nnU-Net's ``get_trainer_from_args``, as ``nnUNetv2_train -num_gpus N`` does.
Optionally the run is interrupted after ``stop_after`` epochs (a checkpoint on disk) and resumed in the same
processes with nnU-Net's ``--c`` logic. Each rank writes a trace (``rank<r>.json``): its batch sizes, the
unlabeled cases it drew per step, its local step losses, what nnU-Net logged, the files it saved with
``torch.save``, and digests of the student's and the EMA teacher's tensors.

``ddp_violations(traces, ...)`` lists what is wrong in the traces: the global batch not split as documented,
ranks drawing the same unlabeled cases, models or teachers that differ by a single bit, ranks switching stage
at different epochs, logged values that are not the gathered ones, a rank other than 0 writing a checkpoint,
a resume that does not restore the interrupted state. Used by the tests (CPU, gloo) and by
``nnUNetv2_versemi_benchmark gpu`` (CUDA, NCCL).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from os.path import join

import numpy as np
import torch

from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.training.config import VerSemiConfig
from nnunetv2_versemi.training.ddp import split_global_batch

CONFIG_FIELDS = {f.name for f in fields(VerSemiConfig)}  # overrides of these replace the trainer's config


class DDPRunError(RuntimeError):
    """A rank of a DDP run failed or did not finish in time (its log is quoted)."""


class DDPJobError(VerSemiInputError):
    """A DDP check asked for something that cannot run (world size, backend, device)."""


@dataclass(frozen=True)
class RankJob:
    """One DDP training run: the union and trainer, its budget, and what to trace.

    ``prepare(trainer, rank)`` runs on every rank after the trainer is built (and again for the resumed one),
    before ``initialize``: tests plant rank-dependent evidence or bugs with it (a module-level function, so that
    it pickles). ``same_seed``: every rank starts from the same random state (else seed + rank)."""

    dataset: str
    configuration: str
    trainer: str
    out: str
    fold: int | str = 0
    plans: str = "nnUNetPlans"
    device: str = "cpu"
    epochs: int = 3
    iterations: int = 3
    val_iterations: int = 1
    stop_after: int | None = None
    final_validation: bool = False
    seed: int = 0
    same_seed: bool = False
    threads: int = 1
    overrides: tuple[tuple[str, object], ...] = ()
    prepare: Callable | None = None
    timeout_s: float = 600.0
    env: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(job: RankJob, world_size: int, backend: str = "gloo") -> list[dict]:
    """Trains ``job`` on ``world_size`` ranks; returns the ranks' traces (rank order). Raises DDPRunError with
    the failing rank's log when a rank fails or the run exceeds ``job.timeout_s``."""
    if world_size < 1:
        raise DDPJobError(f"world size must be >= 1, got {world_size}")
    if backend == "nccl" and (job.device != "cuda" or torch.cuda.device_count() < world_size):
        raise DDPJobError(f"NCCL with {world_size} ranks needs {world_size} CUDA devices, "
                          f"found {torch.cuda.device_count()}")
    os.makedirs(job.out, exist_ok=True)
    for r in range(world_size):
        for suffix in (".json", ".log"):
            if os.path.isfile(join(job.out, f"rank{r}{suffix}")):
                os.remove(join(job.out, f"rank{r}{suffix}"))
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, backend, port, job), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = job.timeout_s + 60
    failed = None
    for r, p in enumerate(procs):
        p.join(deadline)
        if p.is_alive() or p.exitcode != 0:
            failed = failed if failed is not None else r
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if failed is not None:
        raise DDPRunError(f"rank {failed} of {world_size} failed (exit code {procs[failed].exitcode}):\n"
                          + _tail(join(job.out, f"rank{failed}.log")))
    return [json.loads(open(join(job.out, f"rank{r}.json")).read()) for r in range(world_size)]


def _tail(path: str, n: int = 6000) -> str:
    try:
        return open(path, errors="replace").read()[-n:]
    except OSError:
        return "(no log)"


# ---- one rank --------------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, backend: str, port: int, job: RankJob) -> None:
    log = open(join(job.out, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    os.environ.update({k: str(v) for k, v in job.env.items()})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(job.threads)
    import torch.distributed as dist

    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=job.timeout_s))
        if job.device == "cuda":
            torch.cuda.set_device(rank)
        trace = _train_and_trace(rank, world, job)
        with open(join(job.out, f"rank{rank}.json"), "w") as f:
            json.dump(trace, f)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        log.flush()
        os._exit(1)
    log.flush()


class _Interrupted(Exception):
    pass


class _RecordingIterator:
    """The unlabeled augmenter, recording the case ids of every batch it hands out."""

    def __init__(self, inner, keys: list):
        self.inner, self.keys = inner, keys

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.keys.append([str(k) for k in batch["keys"]])
        return batch


def _digest(module: torch.nn.Module | None) -> str | None:
    if module is None:
        return None
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _seed(job: RankJob, rank: int) -> None:
    import random

    s = job.seed if job.same_seed else job.seed + 1000 * rank
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _build(job: RankJob, rank: int, trace: dict):
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_versemi.discovery import ensure_ext_trainer_env

    ensure_ext_trainer_env()
    trainer = get_trainer_from_args(job.dataset, job.configuration, job.fold, job.trainer, job.plans,
                                    device=torch.device(job.device))
    trainer.num_epochs, trainer.num_iterations_per_epoch = job.epochs, job.iterations
    trainer.num_val_iterations_per_epoch = job.val_iterations
    trainer.save_every = 1
    config_changes = {k: v for k, v in job.overrides if k in CONFIG_FIELDS}
    trainer.config = replace(trainer.config, **config_changes)
    for name, value in job.overrides:
        if name not in CONFIG_FIELDS:
            setattr(trainer, name, value)
    if job.prepare is not None:
        job.prepare(trainer, rank)
    _instrument(trainer, trace, job)
    return trainer


def _instrument(trainer, trace: dict, job: RankJob) -> None:
    """Wraps the trainer's hooks on the instance to record what the rank draws, computes and logs."""
    get_dataloaders, train_step, on_epoch_end = trainer.get_dataloaders, trainer.train_step, trainer.on_epoch_end
    on_train_end = trainer.on_train_end

    def traced_get_dataloaders():
        out = get_dataloaders()
        u = trainer.dataloader_unlabeled
        if u is not None:
            loader = getattr(u, "data_loader", None) or getattr(u, "generator", None)
            trace["unlabeled_pool"] = sorted(str(k) for k in loader.indices)
            trace["unlabeled_batch_size"] = int(loader.batch_size)
            trainer.dataloader_unlabeled = _RecordingIterator(u, trace["unlabeled_keys"])
        trace["batch_size"] = int(trainer.batch_size)
        return out

    def traced_train_step(batch):
        out = train_step(batch)
        trace["step_losses"].append(float(out["loss"]))
        trace["step_epochs"].append(int(trainer.current_epoch))
        return out

    def traced_on_epoch_end():
        on_epoch_end()
        if job.stop_after is not None and trainer.current_epoch == job.stop_after and not trace["resumed"]:
            raise _Interrupted()

    def traced_on_train_end():
        if isinstance(trainer.dataloader_unlabeled, _RecordingIterator):
            trainer.dataloader_unlabeled = trainer.dataloader_unlabeled.inner
        on_train_end()

    trainer.get_dataloaders, trainer.train_step = traced_get_dataloaders, traced_train_step
    trainer.on_epoch_end, trainer.on_train_end = traced_on_epoch_end, traced_on_train_end


def _stop_loaders(trainer) -> None:
    """What nnU-Net's on_train_end would shut down, without writing its final checkpoint (an interruption)."""
    u = trainer.dataloader_unlabeled
    for dl in (trainer.dataloader_train, trainer.dataloader_val, getattr(u, "inner", u)):
        if hasattr(dl, "_finish"):
            dl._finish()


def _train_and_trace(rank: int, world: int, job: RankJob) -> dict:
    from nnunetv2.run.run_training import maybe_load_checkpoint

    saved: list[str] = []
    torch_save = torch.save

    def recording_save(obj, f, *args, **kwargs):
        saved.append(os.path.basename(str(f)))
        return torch_save(obj, f, *args, **kwargs)

    torch.save = recording_save
    trace = {"rank": rank, "world": world, "unlabeled_keys": [], "step_losses": [], "step_epochs": [],
             "resumed": False, "saved": saved}
    _seed(job, rank)
    trainer = _build(job, rank, trace)
    try:
        trainer.run_training()
    except _Interrupted:
        trace["stopped"] = {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                            "switch_epoch": trainer.switch_epoch, "model": _digest(trainer._plain_network()),
                            "ema": _digest(trainer.ema_network)}
        _stop_loaders(trainer)
        torch.distributed.barrier()  # rank 0 has written the checkpoint the ranks resume from
        trace["resumed"] = True
        trainer = _build(job, rank, trace)
        maybe_load_checkpoint(trainer, True, False)
        trace["loaded"] = {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                           "switch_epoch": trainer.switch_epoch, "model": _digest(trainer._plain_network()),
                           "ema": _digest(trainer.ema_network)}
        trainer.run_training()
    log = trainer.logger.get_checkpoint()
    trace.update(
        switch_epoch=trainer.switch_epoch, global_step=trainer.global_step,
        model=_digest(trainer._plain_network()), ema=_digest(trainer.ema_network),
        logged={k: [float(x) for x in log[k]] for k in ("train_losses", "versemi_unsup_lambda", "versemi_sup",
                                                         "versemi_rec", "val_losses")},
        output_folder=trainer.output_folder)
    if job.final_validation:
        trainer.perform_actual_validation(False)
    torch.save = torch_save
    return trace


# ---- checks ----------------------------------------------------------------------------------------------
def ddp_violations(traces: list[dict], global_batch: int, global_unlabeled_batch: int | None = None,
                   rtol: float = 1e-5) -> list[str]:
    """What the ranks' traces show to be wrong under DDP; empty when every check holds."""
    world = len(traces)
    problems: list[str] = []
    # the global batches, split like nnU-Net's labeled batch
    sizes = [t.get("batch_size") for t in traces]
    if sizes != [split_global_batch(global_batch, world, r) for r in range(world)]:
        problems.append(f"labeled batch sizes per rank {sizes} are not the split of {global_batch}")
    if global_unlabeled_batch is not None:
        expected = [split_global_batch(global_unlabeled_batch, world, r) for r in range(world)]
        drawn = [sorted({len(k) for k in t["unlabeled_keys"]}) for t in traces]
        if drawn != [[e] for e in expected]:
            problems.append(f"unlabeled batch sizes per rank {drawn} are not the split {expected} of "
                            f"{global_unlabeled_batch}")
        problems += _unlabeled_problems(traces)
    for key, what in (("model", "student"), ("ema", "EMA teacher")):
        if len({t[key] for t in traces}) != 1:
            problems.append(f"the {what}'s tensors differ between ranks")
    switches = [t["switch_epoch"] for t in traces]
    if len(set(switches)) != 1:
        problems.append(f"ranks switched stage at different epochs: {switches}")
    for key in ("train_losses", "versemi_unsup_lambda", "versemi_sup", "val_losses"):
        vals = [t["logged"][key] for t in traces]
        if any(not np.array_equal(v, vals[0], equal_nan=True) for v in vals):
            problems.append(f"logged {key} differ between ranks")
    problems += _gather_problems(traces, rtol)
    for t in traces[1:]:
        if t["saved"]:
            problems.append(f"rank {t['rank']} wrote {sorted(set(t['saved']))}: only rank 0 writes")
    if not traces[0]["saved"]:
        problems.append("rank 0 wrote no checkpoint")
    problems += _resume_problems(traces)
    return problems


def _unlabeled_problems(traces: list[dict]) -> list[str]:
    problems = []
    steps = min(len(t["unlabeled_keys"]) for t in traces)
    if steps == 0:
        return ["no unlabeled batch was drawn"]
    same = [s for s in range(steps)
            if len({tuple(sorted(t["unlabeled_keys"][s])) for t in traces}) < len(traces)]
    if same:
        problems.append(f"ranks drew the same unlabeled cases in {len(same)} of {steps} steps (first: step "
                        f"{same[0]}, {traces[0]['unlabeled_keys'][same[0]]})")
    pools = [set(t.get("unlabeled_pool", [])) for t in traces]
    overlap = set.intersection(*pools) if len(traces) > 1 else set()
    if overlap:
        problems.append(f"the ranks' unlabeled pools share {len(overlap)} case(s), e.g. {sorted(overlap)[:3]}")
    return problems


def _gather_problems(traces: list[dict], rtol: float) -> list[str]:
    """nnU-Net's logged train loss of an epoch must be the mean over every rank's step losses of it."""
    logged = traces[0]["logged"]["train_losses"]
    for epoch, value in enumerate(logged):
        local = [x for t in traces for x, e in zip(t["step_losses"], t["step_epochs"]) if e == epoch]
        if not local:
            continue  # an epoch trained before a resume: its steps were traced by the first trainer
        if not np.isclose(value, np.mean(local), rtol=rtol, atol=0):
            return [f"logged train loss of epoch {epoch} ({value:.6g}) is not the mean over all ranks' steps "
                    f"({np.mean(local):.6g}): not gathered"]
    return []


def _resume_problems(traces: list[dict]) -> list[str]:
    problems = []
    for t in traces:
        if "stopped" not in t:
            continue
        s, lo = t["stopped"], t.get("loaded", {})
        for key in ("epoch", "global_step", "switch_epoch", "model", "ema"):
            if s[key] != lo.get(key):
                problems.append(f"rank {t['rank']}: --c restored {key} {lo.get(key)!r}, the interrupted run had "
                                f"{s[key]!r}")
    return problems


def loss_curve_gap(curve: list[float], reference: list[float]) -> float:
    """Largest relative difference of two per-epoch loss curves, relative to the reference's values."""
    a, b = np.asarray(curve, float), np.asarray(reference, float)
    if a.shape != b.shape:
        raise ValueError(f"curves of different lengths: {len(a)} and {len(b)}")
    return float(np.max(np.abs(a - b) / np.abs(b)))
