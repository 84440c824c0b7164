"""The `hard` demo-data campaign: per-task nnU-Net and the union methods at 10 % and 100 % labels, 3 seeds,
the benchmark protocol of docs/BENCHMARKS.md (2d_cpu of the cpu_demo preset, 20 epochs x 50 iterations per
per-task model, --budget-per task, fold all, no test-time mirroring), every seed's benchmark in a process of its
own so that seeds run side by side on a machine with many cores (and a GPU with -device cuda).

Each seed's union gets an id range of its own (seed unions merged at explicit ids, per-task datasets at the
first free ids after them), so the side-by-side processes never claim the same dataset id. The seeds are then
summarised exactly as ``nnUNetv2_versemi_benchmark --seeds`` does (``seeds.json``, ``seeds.md``, curves).

Usage (nnUNet_raw / nnUNet_preprocessed / nnUNet_results set):
    python hard_campaign.py OUT_DIR [-device cuda] [--settings L10 L100] [--seeds 3] [--deadline SECONDS]
                            [--per-task-methods a e] [--union-methods d c] [--parallel 2]

On a machine with few cores, --parallel caps the benchmark processes running at once (union methods, the longest
runs, start first); the other processes wait for a free slot.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from os.path import isfile, join

from hard_seeds import only_methods

from nnunetv2_versemi.benchmark.seeds import aggregate, seed_union, write_seed_report
from nnunetv2_versemi.entrypoints.data import demo_data_main, merge_main, plan_and_preprocess_main
from nnunetv2_versemi.nnunet_paths import dataset_name

PROTOCOL = ["-c", "2d_cpu", "--plans-preset", "cpu_demo", "--epochs", "20", "--iterations", "50",
            "--val-iterations", "4", "--folds", "all", "--npp", "1", "--disable_tta", "--skip-val",
            "--budget-per", "task"]
# setting: labeled fraction, union id of seed 0 (seed s at + 30 s), union name, per-task methods, union methods
SETTINGS = {"L10": (0.1, 700, "HardL10", ["a", "e", "f"], ["d", "c", "VerSemiTrainer_unsupOnly",
                                                         "VerSemiTrainer_pseudoOnly", "b"]),
            "L100": (1.0, 800, "HardL100", ["a"], ["d"])}
PER_TASK = {"a", "e", "f"}


def _preprocessed(union: str) -> bool:
    """Plans written and every unlabeled case preprocessed (an interrupted run leaves them incomplete)."""
    from nnunetv2_versemi.data.preprocess import missing_unlabeled
    from nnunetv2_versemi.tasktable import find_task_table

    pp = join(os.environ["nnUNet_preprocessed"], union)
    if not isfile(join(pp, "nnUNetPlans.json")):
        return False
    return not missing_unlabeled(pp, "nnUNetPlans_2d", find_task_table(path=join(pp, "nnUNetPlans.json")))


def union_of(setting: str, seed: int, np_: int) -> str:
    fraction, first, name = SETTINGS[setting][:3]
    if seed == 0:
        if not os.path.isdir(join(os.environ["nnUNet_raw"], f"Dataset{first}_{name}")):
            merge_main(["-d", "921", "922", "923", "-o", str(first), "-n", name, "--labeled-fraction", str(fraction),
                        "-np", str(np_), "--no-pbar"])
        if not _preprocessed(f"Dataset{first}_{name}"):
            plan_and_preprocess_main(["-d", str(first), "-c", "2d", "-np", str(np_), "-npfp", str(np_), "--no_pbar"])
        return dataset_name(first)
    return seed_union(dataset_name(first), seed, "2d_cpu", "cpu_demo", np_, set(), new_id=first + 30 * seed)


def _benchmark(union: str, device: str, methods: list[str], out: str, log_name: str, threads: int | None
               ) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from nnunetv2_versemi.entrypoints.benchmark import benchmark_main; benchmark_main()",
           "-d", union, *PROTOCOL, "-device", device, "--methods", *methods, "-o", out]
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return subprocess.Popen(cmd, stdout=open(join(out, log_name), "a"), stderr=subprocess.STDOUT, env=env)


def _finished_methods(out: str, methods: list[str], n_cases: int) -> list[str]:
    """Methods whose predictions of every test case are in the seed's report folder (a before e)."""
    from nnunetv2_versemi.benchmark.methods import method_by_name

    done = [m for m in methods
            if len([f for f in os.listdir(join(out, "predictions", method_by_name(m).key))
                    if f.endswith(".nii.gz")] if os.path.isdir(join(out, "predictions", method_by_name(m).key))
                   else []) == n_cases]
    return done if "a" in done or "e" not in done else [m for m in done if m != "e"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("-device", default="cpu")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-seeds", type=int, nargs="+", default=None,
                   help="train only these of the seeds (the others' finished runs still enter the report)")
    p.add_argument("-np", type=int, default=4, help="processes for merging and planning")
    p.add_argument("--deadline", type=float, default=None, help="stop unfinished runs after this many seconds")
    p.add_argument("--budget", type=int, nargs=3, default=None, metavar=("E", "I", "V"),
                   help="other epochs, iterations, validation iterations (a smoke test; not the protocol)")
    p.add_argument("--per-task-methods", nargs="+", default=None, help="instead of the setting's per-task methods")
    p.add_argument("--union-methods", nargs="+", default=None, help="instead of the setting's union methods")
    p.add_argument("--parallel", type=int, default=None, help="at most this many benchmark processes at once")
    args = p.parse_args()
    for setting in SETTINGS:
        fraction, first, name, per_task, union = SETTINGS[setting]
        SETTINGS[setting] = (fraction, first, name, args.per_task_methods or per_task, args.union_methods or union)
    if args.budget:
        for flag, value in zip(("--epochs", "--iterations", "--val-iterations"), args.budget):
            PROTOCOL[PROTOCOL.index(flag) + 1] = str(value)
    # CPU processes side by side: torch's threads split the cores between them (OMP_NUM_THREADS, unless set).
    # Two 2-thread processes on 2 cores ran a step 6.5 times slower than two 1-thread processes (threads waiting
    # for each other in every small parallel region), docs/BENCHMARKS.md
    threads = max(1, (os.cpu_count() or 1) // args.parallel) if args.parallel and args.device == "cpu" else None
    t0 = time.time()
    if not os.path.isdir(join(os.environ["nnUNet_raw"], "Dataset921_HardOrganCT")):
        demo_data_main(["--preset", "hard"])
    seeds = []
    for setting in args.settings:
        for s in range(args.seeds):
            seeds.append((setting, s, union_of(setting, s, args.np), join(args.out, setting, f"seed{s}")))
    # per-task methods and union methods side by side, in one report folder (distinct runs and predictions);
    # union methods first, since they run longest
    queue = [(setting, s, union, out, part, methods)
             for part, index in (("union", 4), ("per_task", 3))
             for setting, s, union, out in seeds
             for methods in [SETTINGS[setting][index]] if methods
             if args.train_seeds is None or s in args.train_seeds]
    jobs = []
    while queue or any(j.poll() is None for j in jobs):
        while queue and (args.parallel is None or sum(j.poll() is None for j in jobs) < args.parallel):
            setting, s, union, out, part, methods = queue.pop(0)
            os.makedirs(out, exist_ok=True)
            jobs.append(_benchmark(union, args.device, methods, out, f"campaign_{part}.log", threads))
            print(f"{time.time() - t0:6.0f} s: started {setting} seed {s} {part} ({' '.join(methods)}) on {union}",
                  flush=True)
            time.sleep(5)
        if args.deadline and time.time() - t0 > args.deadline:
            queue.clear()
            for j in jobs:
                if j.poll() is None:
                    j.terminate()
            print(f"{time.time() - t0:6.0f} s: deadline reached, unfinished runs stopped", flush=True)
            time.sleep(5)
            break
        time.sleep(10)
    # every seed's report over the methods that finished (all runs skipped, so nothing is trained here)
    for setting in args.settings:
        done = []
        for st, s, union, out in seeds:
            if st != setting:
                continue
            n_cases = 3 * 12
            # the methods of an earlier report stay in it (a run of other methods must not drop them)
            earlier = ([m["letter"] for m in json.load(open(join(out, "results.json")))["methods"]]
                       if isfile(join(out, "results.json")) else [])
            named = list(dict.fromkeys([*SETTINGS[setting][3], *SETTINGS[setting][4], *earlier]))
            methods = _finished_methods(out, named, n_cases)
            print(f"{setting} seed {s}: finished methods {methods}", flush=True)
            if "a" in methods:
                subprocess.run([sys.executable, "-c", "from nnunetv2_versemi.entrypoints.benchmark import "
                                "benchmark_main; benchmark_main()", "-d", union, *PROTOCOL, "-device", args.device,
                                "--methods", *methods, "-o", out],
                               stdout=open(join(out, "campaign_report.log"), "w"), stderr=subprocess.STDOUT)
                if isfile(join(out, "results.json")):
                    done.append((union, out))
        if done:
            per_seed = [json.load(open(join(o, "results.json"))) for _, o in done]
            common = set.intersection(*({m["key"] for m in r["methods"]} for r in per_seed))
            per_seed = [only_methods(r, common) for r in per_seed]
            agg = aggregate(per_seed, [u for u, _ in done])
            agg["command"] = "python docs/results/scripts/hard_campaign.py " + " ".join(sys.argv[1:])
            write_seed_report(join(args.out, setting), agg, per_seed)
            print(f"{setting}: seeds report over {len(done)} seed(s), methods {sorted(common)}", flush=True)
    print(f"{time.time() - t0:6.0f} s: done", flush=True)


if __name__ == "__main__":
    main()
