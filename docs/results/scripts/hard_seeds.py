"""Summarise benchmark runs of several seeds (each seed's ``results.json``, on the union of that seed) over the
methods every seed has, exactly as ``nnUNetv2_versemi_benchmark --seeds`` does: ``seeds.json``, ``seeds.md`` and
the curves plot in OUT_DIR.

Usage:
    python hard_seeds.py OUT_DIR SEED0/results.json SEED1/results.json ... [--methods a d e]
"""
import argparse
import json
import os
import sys

from nnunetv2_versemi.benchmark.methods import method_by_name
from nnunetv2_versemi.benchmark.seeds import aggregate, write_seed_report


def only_methods(results: dict, keys: set) -> dict:
    """A seed's results restricted to the methods ``keys``."""
    r = dict(results)
    r["methods"] = [m for m in results["methods"] if m["key"] in keys]
    r["cases"] = [c for c in results["cases"] if c["method"] in keys]
    r["summary"] = {k: v for k, v in results["summary"].items() if k in keys}
    r["runs"] = [st for st in results["runs"] if st["method"] in keys]
    return r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("results", nargs="+", help="results.json of each seed, seed 0 first")
    p.add_argument("--methods", nargs="+", default=None, help="method letters or names (default: those all share)")
    args = p.parse_args()
    per_seed = [json.load(open(f)) for f in args.results]
    common = set.intersection(*({m["key"] for m in r["methods"]} for r in per_seed))
    if args.methods:
        wanted = {method_by_name(m).key for m in args.methods}
        if not wanted <= common:
            sys.exit(f"methods {sorted(wanted - common)} are missing from some seed; every seed has {sorted(common)}")
        common = wanted
    per_seed = [only_methods(r, common) for r in per_seed]
    agg = aggregate(per_seed, [r["dataset"] for r in per_seed])
    agg["command"] = "python docs/results/scripts/hard_seeds.py " + " ".join(sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    write_seed_report(args.out, agg, per_seed)
    print(f"seeds report over {len(per_seed)} seed(s), methods {sorted(common)}: {args.out}")


if __name__ == "__main__":
    main()
