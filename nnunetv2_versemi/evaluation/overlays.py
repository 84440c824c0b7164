"""Overlay PNGs for a quick visual check of predictions.

One figure per case: the axial slice (first array axis, nnU-Net order z, y, x) with the most reference
foreground of the evaluated classes (if the reference is empty, the most predicted foreground; else the
middle slice). Left panel: image with the reference filled; right panel: image with the prediction filled
and the reference outlined. Without an image the panels show the label maps on black.
Rendering goes through matplotlib's Agg canvas directly, so the global pyplot backend is never touched.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from nnunetv2_versemi.evaluation.labelio import EvaluationError, read_first_channel, read_label_map

_COLORS = [
    (0.90, 0.10, 0.10),
    (0.10, 0.70, 0.10),
    (0.15, 0.35, 0.95),
    (0.95, 0.75, 0.05),
    (0.80, 0.20, 0.80),
    (0.05, 0.80, 0.80),
    (0.95, 0.50, 0.05),
    (0.55, 0.35, 0.15),
]


def choose_slice(ref: np.ndarray, pred: np.ndarray, values: list[int]) -> int:
    """Index along axis 0 with the most reference voxels of ``values`` (then prediction, then middle)."""
    for arr in (ref, pred):
        counts = np.isin(arr, values).reshape(arr.shape[0], -1).sum(1)
        if counts.max() > 0:
            return int(np.argmax(counts))
    return arr.shape[0] // 2


def _class_index_map(seg2d: np.ndarray, values: list[int]) -> np.ndarray:
    """0 = none, i + 1 = values[i]; other label values (e.g. other tasks' classes) are not drawn."""
    out = np.zeros(seg2d.shape, dtype=np.int16)
    for i, v in enumerate(values):
        out[seg2d == v] = i + 1
    return out


def _display_range(img2d: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img2d, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def render_slice_overlay(
    out_path: str | os.PathLike,
    ref2d: np.ndarray,
    pred2d: np.ndarray,
    labels: list[tuple[str, int]],
    image2d: np.ndarray | None = None,
    title: str = "",
    dice: dict[str, float] | None = None,
    aspect: float = 1.0,
) -> None:
    """Write one side-by-side PNG (reference | prediction) of 2D label maps, optionally over an image.

    ``aspect``: physical height / width of one pixel (row spacing / column spacing).
    """
    values = [v for _, v in labels]
    colors = [_COLORS[i % len(_COLORS)] for i in range(len(values))]
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*c, 1.0) for c in colors])
    ref_idx = _class_index_map(ref2d, values)
    pred_idx = _class_index_map(pred2d, values)

    fig = Figure(figsize=(10, 5.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, idx, name in ((axes[0], ref_idx, "reference"), (axes[1], pred_idx, "prediction")):
        if image2d is not None:
            lo, hi = _display_range(image2d)
            ax.imshow(image2d, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", aspect=aspect)
            alpha = 0.45
        else:
            ax.imshow(np.zeros(idx.shape), cmap="gray", vmin=0, vmax=1, aspect=aspect)
            alpha = 1.0
        masked = np.ma.masked_equal(idx, 0)
        ax.imshow(
            masked, cmap=cmap, vmin=0, vmax=len(values), alpha=alpha, interpolation="nearest", aspect=aspect
        )
        for i in range(len(values)):
            mask = ref_idx == i + 1
            # contour needs a non-constant grid of at least 2 x 2
            if mask.any() and not mask.all() and min(mask.shape) > 1:
                ax.contour(mask, levels=[0.5], colors=[colors[i]], linewidths=1.0)
        ax.set_title(name)
        ax.set_axis_off()
    handles = []
    for (n, v), c in zip(labels, colors):
        text = f"{n} ({v})" + (f" Dice {dice[n]:.3f}" if dice is not None and n in dice else "")
        handles.append(Patch(color=c, label=text))
    fig.legend(handles=handles, loc="lower center", ncol=min(4, max(1, len(handles))), fontsize=8)
    fig.suptitle(title)
    fig.savefig(out_path)


def render_case_overlay(
    out_path: str | os.PathLike,
    ref_file: str,
    pred_file: str,
    labels: list[tuple[str, int]],
    image_file: str | None = None,
    title: str = "",
    dice: dict[str, float] | None = None,
) -> int:
    """Read one case and write its overlay PNG; returns the slice index shown."""
    ref, geometry = read_label_map(ref_file)
    pred, _ = read_label_map(pred_file)
    spacing = geometry["spacing"]
    image = None
    if image_file is not None:
        image = read_first_channel(image_file)
        if image.shape != ref.shape:
            raise EvaluationError(
                f"Image {image_file} has shape {image.shape} but the labels {ref_file} {ref.shape}"
            )
    z = choose_slice(ref, pred, [v for _, v in labels])
    render_slice_overlay(
        out_path,
        ref[z],
        pred[z],
        labels,
        None if image is None else image[z],
        title=f"{title}  slice {z}" if title else f"slice {z}",
        dice=dice,
        aspect=spacing[-2] / spacing[-1] if len(spacing) >= 2 else 1.0,
    )
    return z
