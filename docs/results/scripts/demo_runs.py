"""Summarise full runs of the README demo (``nnUNetv2_versemi_demo --workdir DIR``, each DIR one run): per run the
wall time, the training time and per task the prompted / auto / stock test Dice, DemoMC's lesion and the cases
recognised; then min / median / max over the runs. Writes JSON and prints a markdown table.

Usage: python demo_runs.py OUT.json DIR [DIR ...]
"""
import json
import statistics
import sys
from os.path import join


def run_row(workdir: str) -> dict:
    with open(join(workdir, "summary.json")) as f:
        s = json.load(f)
    row = {"workdir": workdir, "minutes": s["minutes"], "train_seconds": s["step_seconds"]["train"], "tasks": {}}
    for task, t in s["tasks"].items():
        row["tasks"][task] = {m: t[m]["dice"] for m in ("prompted", "auto", "stock")}
        row["tasks"][task]["recognised"] = sum(r == task for r in t["recognised"].values())
        row["tasks"][task]["cases"] = len(t["recognised"])
        for m in ("prompted", "auto", "stock"):
            for cls, v in (t[m].get("classes") or {}).items():
                if isinstance(v, dict) and len(t[m]["classes"]) > 1:
                    row["tasks"][task][f"{m}_{cls}"] = v["dice"]
    return row


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    out, dirs = sys.argv[1], sys.argv[2:]
    rows = [run_row(d) for d in dirs]
    tasks = list(rows[0]["tasks"])
    keys = sorted({k for r in rows for t in tasks for k in r["tasks"][t] if k not in ("cases",)})
    summary = {"minutes": spread([r["minutes"] for r in rows]),
               "train_seconds": spread([r["train_seconds"] for r in rows]),
               "tasks": {t: {k: spread([r["tasks"][t][k] for r in rows if k in r["tasks"][t]])
                             for k in keys if any(k in r["tasks"][t] for r in rows)} for t in tasks}}
    with open(out, "w") as f:
        json.dump({"command": "python docs/results/scripts/demo_runs.py " + " ".join(sys.argv[1:]), "runs": rows,
                   "min_median_max": summary}, f, indent=2)
    print("| | min | median | max |\n|---|---|---|---|")
    print("| wall time (min) | " + " | ".join(f"{summary['minutes'][k]:.1f}" for k in ("min", "median", "max")) + " |")
    print("| training (s) | " + " | ".join(f"{summary['train_seconds'][k]:.0f}" for k in ("min", "median", "max")) + " |")
    for t in tasks:
        for k, v in summary["tasks"][t].items():
            fmt = "{:.0f}" if k == "recognised" else "{:.3f}"
            print(f"| {t} {k} | " + " | ".join(fmt.format(v[q]) for q in ("min", "median", "max")) + " |")


if __name__ == "__main__":
    main()
