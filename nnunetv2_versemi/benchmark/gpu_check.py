"""``nnUNetv2_versemi_benchmark gpu``: what a GPU machine must show before VerSemi is trained on it.

1. The step time of VerSemiTrainer against nnUNetTrainer, with AMP on CUDA: ``speed.run_speed`` (the
   ``speed`` subcommand's measurement, synthetic plans by default: 96^3 patch, batch 2, 4 tasks).
2. VerSemi under DDP, as ``nnUNetv2_train -num_gpus 2`` runs it: a tiny demo union, 2 ranks (NCCL on 2 GPUs;
   gloo on CPU as a dry run), interrupted after half the epochs and resumed with ``--c``, the final
   validation, and every check of ``ddp_check.ddp_violations``. With one GPU the 2-rank check cannot run:
   it is reported as skipped, and one rank runs the same job through NCCL and DDP (the CUDA code path:
   device ids, SyncBatchNorm conversion, AMP under DDP).

Everything is written in a temporary nnU-Net folder; the result is one dictionary (JSON by the command).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from os.path import join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunetv2_versemi.benchmark import ddp_check, speed
from nnunetv2_versemi.errors import VerSemiInputError

UNION_ID = 995


class GpuCheckError(VerSemiInputError):
    """Bad input to the GPU check (device, world size, budget)."""


def build_tiny_union(dataset_id: int = UNION_ID, num_processes: int = 1) -> str:
    """The demo tasks at half resolution (4 labeled + 3 unlabeled cases each, 3 labels kept per task), merged,
    planned and preprocessed (2d) under the current ``nnUNet_*`` folders; returns the union's id."""
    from nnunetv2_versemi.data import merge
    from nnunetv2_versemi.data.demo_data import generate_demo_datasets
    from nnunetv2_versemi.data.preprocess import plan_and_preprocess

    generate_demo_datasets(os.environ["nnUNet_raw"], num_labeled=4, num_unlabeled=3, num_test=0, scale=0.5)
    merge.merge_datasets([901, 902, 903], dataset_id, "GpuCheck", labeled_cases=3, num_processes=num_processes,
                         progress=False)
    plan_and_preprocess(dataset_id, ["2d"], [num_processes], num_processes, progress=False)
    return str(dataset_id)


def ddp_world(device: str, requested: int) -> tuple[int, str, str | None]:
    """(ranks, backend, why the 2-rank check is skipped or None) for ``device``."""
    if requested < 1:
        raise GpuCheckError(f"--ranks must be at least 1, got {requested}")
    if device == "cpu":
        return requested, "gloo", None
    if device != "cuda":
        raise GpuCheckError(f"-device {device}: the DDP check runs on cuda (NCCL) or cpu (gloo)")
    gpus = torch.cuda.device_count()
    if gpus < 1:
        raise GpuCheckError("-device cuda: no CUDA device (use -device cpu for the dry run)")
    if gpus < requested:
        return 1, "nccl", (f"{gpus} CUDA device(s): the {requested}-rank DDP check needs {requested}; one rank ran "
                           "the same job through NCCL and DDP instead")
    return requested, "nccl", None


@contextlib.contextmanager
def _scratch(own_union: bool):
    """Temporary nnU-Net folders; with a given union (``own_union`` False) only the results are temporary."""
    if own_union:
        with speed.scratch_nnunet_env():
            yield
        return
    old = os.environ.get("nnUNet_results")
    with tempfile.TemporaryDirectory(prefix="versemi_gpu_check_") as tmp:
        os.environ["nnUNet_results"] = tmp
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("nnUNet_results", None)
            else:
                os.environ["nnUNet_results"] = old


def run_ddp_check(device: str, ranks: int, epochs: int, iterations: int, dataset: str | None, out: str,
                  num_processes: int = 1, log=print) -> dict:
    """The DDP part (see the module docstring) in a temporary nnU-Net folder; returns its report."""
    world, backend, skipped = ddp_world(device, ranks)
    if epochs < 2 or iterations < 1:
        raise GpuCheckError(f"the DDP check needs at least 2 epochs of 1 iteration, got {epochs} x {iterations}")
    with _scratch(dataset is None):
        t0 = time.perf_counter()
        if dataset is None:
            log("building the tiny demo union (2d)")
            dataset = build_tiny_union(num_processes=num_processes)
        from nnunetv2_versemi.nnunet_paths import dataset_name, preprocessed_folder

        pp = preprocessed_folder(dataset_name(dataset))
        global_batch = load_json(join(pp, "nnUNetPlans.json"))["configurations"]["2d"]["batch_size"]
        prep_s = time.perf_counter() - t0
        job = ddp_check.RankJob(
            dataset, "2d", "VerSemiTrainer", out=join(out, "ddp_traces"), device=device, epochs=epochs,
            iterations=iterations, val_iterations=1, stop_after=epochs // 2, final_validation=True,
            env={"nnUNet_n_proc_DA": "0" if device == "cpu" else "2", "nnUNet_def_n_proc": str(num_processes),
                 "nnUNet_compile": "false"})
        log(f"training {epochs} x {iterations} steps on {world} rank(s), {backend}, global batch {global_batch}")
        t0 = time.perf_counter()
        traces = ddp_check.run_ranks(job, world, backend)
        train_s = time.perf_counter() - t0
    problems = ddp_check.ddp_violations(traces, global_batch, global_batch)
    return {"world_size": world, "backend": backend, "skipped": skipped, "global_batch": global_batch,
            "batch_per_rank": [t["batch_size"] for t in traces], "switch_epoch": traces[0]["switch_epoch"],
            "train_losses": traces[0]["logged"]["train_losses"], "violations": problems, "passed": not problems,
            "union_s": round(prep_s, 1), "ddp_run_s": round(train_s, 1)}


def run_gpu_check(speed_args: argparse.Namespace, ranks: int, epochs: int, iterations: int, dataset: str | None,
                  out: str, num_processes: int = 1, skip_speed: bool = False, log=print) -> dict:
    """Step-time ratio (``speed``) and the DDP check; returns both with the machine's description."""
    device = speed_args.device
    result = {"device": device, "torch": torch.__version__, "cuda_devices": torch.cuda.device_count(),
              "gpu": torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None,
              "cpu_count": os.cpu_count()}
    ddp_world(device, ranks)  # bad input fails before anything runs
    if not skip_speed:
        t0 = time.perf_counter()
        result["speed"] = speed.run_speed(speed_args, log=log)
        result["speed"]["wall_s"] = round(time.perf_counter() - t0, 1)
    result["ddp"] = run_ddp_check(device, ranks, epochs, iterations, dataset, out, num_processes, log)
    return result


def markdown(result: dict) -> str:
    lines = [f"GPU check on {result['gpu'] or result['device']} (torch {result['torch']}, "
             f"{result['cuda_devices']} CUDA device(s), {result['cpu_count']} CPUs)", ""]
    if "speed" in result:
        lines.append(speed.markdown(result["speed"]))
    d = result["ddp"]
    lines += [f"DDP: {d['world_size']} rank(s), {d['backend']}, global batch {d['global_batch']} split "
              f"{d['batch_per_rank']}, stage switch at epoch {d['switch_epoch']}, train losses "
              f"{[round(x, 4) for x in d['train_losses']]} ({d['ddp_run_s']} s)",
              "checks: " + ("all passed" if d["passed"] else "FAILED: " + "; ".join(d["violations"]))]
    if d["skipped"]:
        lines.append(f"2-rank check skipped: {d['skipped']}")
    return "\n".join(lines) + "\n"
