"""``nnUNetv2_versemi_benchmark`` and its subcommands ``speed``, ``gpu``, ``pool``, ``recognition``, ``add-task``
and ``plans``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from nnunetv2_versemi.entrypoints.common import add_device, add_processes, input_errors_exit

PROG = "nnUNetv2_versemi_benchmark"


def benchmark_main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    subcommands = {"speed": speed_main, "recognition": recognition_main, "plans": plans_main, "gpu": gpu_main,
                   "pool": pool_main, "add-task": add_task_main}
    if argv and argv[0] in subcommands:
        subcommands[argv[0]](argv[1:])
        return
    args = build_benchmark_parser().parse_args(argv)
    args.argv = argv
    # nnU-Net reads its worker count once, at import; the final validation spawns that many exporters
    os.environ.setdefault("nnUNet_def_n_proc", str(max(1, args.npp)))
    if args.seeds < 1:
        build_benchmark_parser().error(f"--seeds must be at least 1, got {args.seeds}")
    with input_errors_exit(PROG):
        if args.seeds > 1:
            from nnunetv2_versemi.benchmark.seeds import run_seeds

            run_seeds(args)
            return
        from nnunetv2_versemi.benchmark.comparison import run_benchmark

        run_benchmark(args)


def speed_main(argv: list[str] | None = None) -> None:
    import numpy as np

    from nnunetv2_versemi.benchmark import speed

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_speed_parser().parse_args(argv)
    args.argv = ["speed", *argv]
    if args.d is None and args.batch_size is None:
        args.batch_size = 4
    with input_errors_exit(speed.PROG):
        result = speed.run_speed(args, log=lambda m: print(f"[speed] {m}", flush=True))
    text = speed.markdown(result)
    print(text)
    if args.o:
        os.makedirs(args.o, exist_ok=True)
        with open(os.path.join(args.o, "speed.json"), "w") as f:
            json.dump(result, f, indent=2,
                      default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
        with open(os.path.join(args.o, "speed.md"), "w") as f:
            f.write(text)


GPU_SPEED_DEFAULTS = ["--patch", "96", "96", "96", "--batch-size", "2", "--main-tasks", "4", "--scale-tasks", "4",
                      "--warmup", "3", "--steps", "10", "--no-reference", "--no-prediction"]


def gpu_main(argv: list[str] | None = None) -> None:
    """``nnUNetv2_versemi_benchmark gpu``: flags it does not know go to the ``speed`` measurement, after the
    GPU check's defaults (GPU_SPEED_DEFAULTS), so any of them can be replaced."""
    import numpy as np

    from nnunetv2_versemi.benchmark import gpu_check

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=f"{PROG} gpu", description=gpu_check.__doc__.split("\n\n")[0])
    add_device(p)
    p.add_argument("-o", required=True, help="folder for gpu_check.json, gpu_check.md and the ranks' logs")
    p.add_argument("--ranks", type=int, default=2, help="DDP ranks (default 2: one per GPU)")
    p.add_argument("--epochs", type=int, default=4, help="DDP check: epochs (interrupted and resumed halfway)")
    p.add_argument("--iterations", type=int, default=5, help="DDP check: iterations per epoch (default 5)")
    p.add_argument("-d", default=None, help="DDP check: an existing union (2d) instead of the tiny demo union")
    p.add_argument("-np", type=int, default=1, help="worker processes for building the union and validation")
    p.add_argument("--no-speed", action="store_true", help="skip the step-time ratio")
    args, rest = p.parse_known_args(argv)
    speed_args = build_speed_parser().parse_args([*GPU_SPEED_DEFAULTS, *rest, "-device", args.device])
    speed_args.argv = ["gpu", *argv]
    with input_errors_exit(f"{PROG} gpu"):
        result = gpu_check.run_gpu_check(speed_args, args.ranks, args.epochs, args.iterations, args.d, args.o,
                                         args.np, args.no_speed, log=lambda m: print(f"[gpu] {m}", flush=True))
    result["command"] = " ".join([PROG, "gpu", *argv])
    text = gpu_check.markdown(result)
    print(text)
    os.makedirs(args.o, exist_ok=True)
    with open(os.path.join(args.o, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
    with open(os.path.join(args.o, "gpu_check.md"), "w") as f:
        f.write(text)
    if not result["ddp"]["passed"]:
        raise SystemExit(1)


def pool_main(argv: list[str] | None = None) -> None:
    """``nnUNetv2_versemi_benchmark pool``: merge, unlabeled preprocessing, trainer start-up, memory and step time
    against the size of the unlabeled pool."""
    from nnunetv2_versemi.benchmark import pool_scale

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=pool_scale.PROG, description=pool_scale.__doc__.split("\n\n")[0])
    p.add_argument("-o", required=True, help="folder for pool_scale.json/.md/.png and one scratch tree per size")
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000],
                   help="unlabeled pool sizes, increasing (default: 100 1000 10000; split over the 3 demo tasks)")
    p.add_argument("--steps", type=int, default=50, help="training steps per size (default 50)")
    p.add_argument("--scale", type=float, default=0.5, help="voxels per axis of the demo images (default 0.5)")
    p.add_argument("--labeled", type=int, default=4, help="labeled cases per task (default 4)")
    p.add_argument("-np", type=int, default=2, help="processes for merging and preprocessing (default 2)")
    p.add_argument("--n-proc-da", type=int, default=1, help="nnUNet_n_proc_DA of the trainer (default 1)")
    p.add_argument("-tr", default="VerSemiTrainer", help="trainer class (default VerSemiTrainer)")
    a = p.parse_args(argv)
    if a.steps < 6:
        p.error(f"--steps must be at least 6 (the first 5 are warm-up), got {a.steps}")
    with input_errors_exit(pool_scale.PROG):
        try:
            result = pool_scale.run_pool_scale(
                a.o, a.sizes, a.steps, a.np, a.scale, a.labeled, a.n_proc_da, a.tr,
                command=" ".join([PROG, "pool", *argv]), log=lambda m: print(f"[pool] {m}", flush=True))
        except ValueError as e:
            p.error(str(e))
    print(pool_scale.markdown(result))


def recognition_main(argv: list[str] | None = None) -> None:
    from nnunetv2_versemi.benchmark import recognition

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_recognition_parser().parse_args(argv)
    args.argv = ["recognition", *argv]
    with input_errors_exit(recognition.PROG):
        recognition.run_recognition(args)


def add_task_main(argv: list[str] | None = None) -> None:
    from nnunetv2_versemi.benchmark.add_task_bench import PROG as ADD_PROG
    from nnunetv2_versemi.benchmark.add_task_bench import run_add_task_benchmark

    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_add_task_parser().parse_args(argv)
    args.argv = argv
    os.environ.setdefault("nnUNet_def_n_proc", str(max(1, args.np)))
    with input_errors_exit(ADD_PROG):
        run_add_task_benchmark(args)


def plans_main(argv: list[str] | None = None) -> None:
    from nnunetv2_versemi.entrypoints.presets import add_preset_arguments, run_preset_command

    p = argparse.ArgumentParser(prog=f"{PROG} plans", description="Apply a plans preset to a plans file.")
    add_preset_arguments(p)
    run_preset_command(p.parse_args(argv), p.prog)


def _add_union_arguments(p: argparse.ArgumentParser) -> None:
    """-d, -c, -p: the union dataset, its configuration and plans."""
    p.add_argument(
        "-d", required=True, help="union dataset id or name (nnUNetv2_versemi_merge + plan_and_preprocess)"
    )
    p.add_argument("-c", required=True, help="configuration, e.g. 2d (or one a --plans-preset adds)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier of the union (default: nnUNetPlans)")


def _add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """--epochs, --iterations, --val-iterations, --budget-per: the training budget of every model."""
    p.add_argument(
        "--epochs", type=int, default=1000, help="epochs per trained model (default: 1000, nnU-Net's)"
    )
    p.add_argument("--iterations", type=int, default=250, help="training iterations per epoch (default: 250)")
    p.add_argument(
        "--val-iterations", type=int, default=50, help="validation iterations per epoch (default: 50)"
    )
    p.add_argument(
        "--budget-per",
        choices=["model", "task"],
        default="model",
        help="model (default): every trained model gets the budget; task: the runs on the union get T times "
        "the iterations per epoch (T tasks), as many labeled batches per task as each per-task model",
    )


def _add_run_arguments(p: argparse.ArgumentParser, methods: list[str]) -> None:
    """--folds, --methods (default: ``methods``), -o: what is trained and where the report goes."""
    p.add_argument(
        "--folds",
        nargs="+",
        default=["0"],
        help="folds of the union's split to train (ensembled at test time), or 'all' (default: 0)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=methods,
        help="a/alone b/union c/noUnsup d/versemi e/pseudo f/alonePCD g/aloneFg67 (default: a b c d e), or trainer "
        "class names (ablations, trained on the union)",
    )
    p.add_argument(
        "-o",
        default=None,
        help="report folder (default: $nnUNet_results/<union>/benchmark__<benchmark plans>__<c>)",
    )


def _add_execution_arguments(p: argparse.ArgumentParser) -> None:
    """-device, --npp, --plans-preset, --seeds, --disable_tta, --skip-val: how the benchmark runs."""
    add_device(p)
    p.add_argument(
        "--npp",
        type=int,
        default=2,
        help="processes for preprocessing, prediction and nnU-Net's validation export (default: 2; "
        "1 = no worker processes)",
    )
    p.add_argument(
        "--plans-preset",
        default=None,
        help="apply a plans preset (e.g. cpu_demo, paper_96, or a JSON path) to every plans file",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat the benchmark over N seeds: seed s > 0 re-merges the union's sources with merge seed + s "
        "(new labeled subset, same test cases when they come from the sources' imagesTs) and retrains; "
        "seeds.json/seeds.md give mean ± std over seeds and paired differences to (a) with 95%% CIs (default: 1)",
    )
    p.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    p.add_argument(
        "--skip-val",
        action="store_true",
        help="skip nnU-Net's final validation of each model (the report uses the test cases only)",
    )


def build_benchmark_parser() -> argparse.ArgumentParser:
    from nnunetv2_versemi.benchmark import methods

    p = argparse.ArgumentParser(
        prog=methods.PROG,
        description="VerSemi vs nnU-Net baselines on one union dataset: same labeled cases, test cases and "
        "budget for every method. Subcommands: 'speed' (step time/memory), 'plans' (apply a plans preset).",
    )
    _add_union_arguments(p)
    _add_budget_arguments(p)
    _add_run_arguments(p, list(methods.DEFAULT_METHODS))
    _add_execution_arguments(p)
    return p


def build_speed_parser() -> argparse.ArgumentParser:
    from nnunetv2_versemi.benchmark import speed

    p = argparse.ArgumentParser(
        prog=speed.PROG, description=speed.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "-d", default=None, help="union dataset (its plans and task table); default: synthetic plans"
    )
    p.add_argument("-c", default="2d", help="configuration with -d (default: 2d)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier with -d")
    p.add_argument("--plans-preset", default=None, help="apply a plans preset to the plans of -d first")
    p.add_argument(
        "--patch", type=int, nargs="+", default=[64, 64], help="synthetic plans: patch (default 64 64)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size (synthetic default 4; with -d overrides the plans' batch size)",
    )
    p.add_argument("--features", type=int, default=32, help="synthetic plans: features of the first stage")
    p.add_argument("--main-tasks", type=int, default=4, help="synthetic plans: tasks of the main comparison")
    p.add_argument(
        "--scale-tasks", type=int, nargs="+", default=[2, 8], help="task counts for the scaling test"
    )
    p.add_argument(
        "--ref-tasks", type=int, default=4, help="task count of the per-prompt reference (default 4)"
    )
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per contender (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per contender, interleaved (default 5)")
    p.add_argument(
        "--slices", type=int, default=8, help="2d: slices of the prediction test image (default 8)"
    )
    p.add_argument("--pred-repeats", type=int, default=3, help="timed sliding-window repeats (default 3)")
    p.add_argument("--tta", action="store_true", help="mirroring in the prediction timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--no-prediction", action="store_true", help="skip the prediction timing")
    p.add_argument("--no-reference", action="store_true", help="skip the per-prompt reference")
    p.add_argument("--trainers", nargs="+", default=[], metavar="TRAINER",
                   help="also time these VerSemi trainer classes (e.g. VerSemiTrainer_paperTerms) at the main task "
                        "count, each against nnU-Net")
    add_device(p)
    p.add_argument("-o", default=None, help="folder for speed.json and speed.md (default: print only)")
    return p


def build_add_task_parser() -> argparse.ArgumentParser:
    from nnunetv2_versemi.benchmark import add_task_bench

    p = argparse.ArgumentParser(prog=add_task_bench.PROG, description=add_task_bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", required=True,
                   help="raw source datasets (ids or names); the last one is the task added to the model of the others")
    p.add_argument("-o", required=True, help="report folder (add_task.json, add_task.md, add_task_curves.png)")
    p.add_argument("--first-id", type=int, default=600,
                   help="dataset id of seed 0's first union (seed s: +3 s; before, after, scratch; default 600)")
    p.add_argument("--seeds", type=int, default=3, help="seeds (merge seed 12345 + s; default 3)")
    p.add_argument("-c", default="2d", help="configuration (default 2d; e.g. 2d_cpu with --plans-preset cpu_demo)")
    p.add_argument("--plans-preset", default=None, help="plans preset of every model (e.g. cpu_demo)")
    p.add_argument("-tr", default="VerSemiTrainer", help="VerSemi trainer of the union models (default VerSemiTrainer)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--labeled-fraction", type=float, default=None, help="labeled cases kept per task (fraction)")
    sel.add_argument("--labeled-cases", type=int, default=None, help="labeled cases kept per task (number)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs of every from-scratch model (default 1000)")
    p.add_argument("--iterations", type=int, default=250,
                   help="iterations per epoch and task (the union models get T times as many; default 250)")
    p.add_argument("--val-iterations", type=int, default=50, help="validation iterations per epoch (default 50)")
    p.add_argument("--finetune-fraction", type=float, default=0.25,
                   help="fine-tuning epochs as a fraction of the from-scratch union's (default 0.25)")
    p.add_argument("--finetune-tr", default=None,
                   help="VerSemi trainer of the fine-tuning (default: -tr); the same models before, from scratch and "
                        "per task, fine-tuned in seed<s>/after_<trainer>")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    add_processes(p, "-np", default=1, help="processes for merging, preprocessing and prediction (default 1)")
    add_device(p)
    return p


def build_recognition_parser() -> argparse.ArgumentParser:
    from nnunetv2_versemi.benchmark import recognition

    p = argparse.ArgumentParser(prog=recognition.PROG, description=recognition.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="union dataset id or name")
    p.add_argument("-c", required=True, help="configuration")
    p.add_argument("-tr", default="VerSemiTrainer", help="trainer class (default VerSemiTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-f", nargs="+", default=["0"], help="fold (one; default 0)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    add_device(p)
    return p
