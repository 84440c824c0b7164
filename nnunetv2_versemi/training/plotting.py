"""Progress plot of the VerSemi loss terms, per-task pseudo Dice and task recognition accuracy (next to
nnU-Net's progress.png)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nnunetv2_versemi.tasktable import TaskTable  # noqa: E402

_TERMS = {"sup": "L_sup", "syn": "L_syn", "spec": "L_spec", "unsup": "L_unsup", "cons": "L_cons",
          "rec": "L_rec (task recognition)"}


def plot_versemi_progress(log: dict, table: TaskTable, filename: str) -> None:
    # nnU-Net's own progress plot changes the global style (seaborn, font scale 2.5); draw in the default one
    with plt.style.context("default"):
        _plot(log, table, filename)


def _plot(log: dict, table: TaskTable, filename: str) -> None:
    n = min(len(log.get(f"versemi_{k}", [])) for k in _TERMS)
    fig, (ax_loss, ax_dice) = plt.subplots(2, 1, figsize=(10, 9))
    x = np.arange(n)
    for key, label in _TERMS.items():
        vals = np.asarray(log[f"versemi_{key}"][:n], dtype=float)
        if np.any(np.isfinite(vals)):
            ax_loss.plot(x, vals, label=label)
    lam = np.asarray(log.get("versemi_unsup_lambda", [])[:n], dtype=float)
    kept = np.asarray(log.get("versemi_unsup_kept", [])[:n], dtype=float)
    if lam.size:
        ax_l = ax_loss.twinx()
        ax_l.plot(x, lam, "k:", label="lambda (unlabeled weight)")
        if kept.size and np.any(np.isfinite(kept)):
            ax_l.plot(np.arange(kept.size), kept, "k--", lw=0.8, label="unlabeled samples kept by the guard")
        ax_l.set_ylabel("lambda / share kept")
        ax_l.set_ylim(-0.05, 1.05)
        ax_l.legend(loc="lower left", fontsize="small")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss term")
    ax_loss.legend(loc="center right", fontsize="small")
    ax_loss.set_title("VerSemi loss terms")
    dice = log.get("dice_per_class_or_region", [])
    m = min(len(dice), n) if n else len(dice)
    per_task = [table.per_task_mean(d) for d in dice[:m]]
    rec = np.asarray(log.get("versemi_recognition", [])[:m], dtype=float).reshape(-1, table.num_tasks)
    for ti, task in enumerate(table.tasks):
        line, = ax_dice.plot(np.arange(m), [p[task.name] for p in per_task], label=f"{task.name}: pseudo Dice")
        if rec.size and np.any(np.isfinite(rec[:, ti])):
            ax_dice.plot(np.arange(len(rec)), rec[:, ti], ":", color=line.get_color(),
                         label=f"{task.name}: task recognised")
    switch = np.flatnonzero(lam > 0)
    if switch.size:  # the first epoch with the unlabeled terms on (stage switch or ramp start)
        for ax in (ax_loss, ax_dice):
            ax.axvline(switch[0], color="grey", ls="--", lw=0.8)
    ax_dice.set_xlabel("epoch (dashed: unlabeled terms on)")
    ax_dice.set_ylabel("pseudo Dice (own prompt) / recognition accuracy")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)
