"""Overlay PNGs for a quick visual check of predictions.

One figure per case, one row per axial slice shown (first array axis, nnU-Net order z, y, x): the slice with
the most reference foreground of the evaluated classes (if the reference is empty, the most predicted
foreground; else the middle slice) and, below it, the slice where the prediction is most wrong (most false
positives plus false negatives over the evaluated classes), so that scattered false positives in slices
without the target show up too. Left panel: image with the reference filled; right panel: image with the
prediction filled and the reference outlined (the legend says so). Without an image the panels show the
label maps on black.
Rendering goes through matplotlib's Agg canvas directly, so the global pyplot backend is never touched.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
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


def error_slice(ref: np.ndarray, pred: np.ndarray, values: list[int]) -> tuple[int, int]:
    """(index along axis 0, its count) of the slice with the most wrong voxels over the classes ``values``:
    false positives plus false negatives, a voxel whose class (one of ``values``, or none) differs between
    reference and prediction. Other label values (other tasks' classes) count as none. Count 0: no error."""
    wrong = _class_index_map(ref, values) != _class_index_map(pred, values)
    counts = wrong.reshape(wrong.shape[0], -1).sum(1)
    z = int(np.argmax(counts))
    return z, int(counts[z])


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
    ref2d: np.ndarray | list[np.ndarray],
    pred2d: np.ndarray | list[np.ndarray],
    labels: list[tuple[str, int]],
    image2d: np.ndarray | list[np.ndarray | None] | None = None,
    title: str = "",
    dice: dict[str, float] | None = None,
    aspect: float = 1.0,
    row_titles: list[str] | None = None,
) -> None:
    """Write one PNG of 2D label maps, optionally over an image: per row a reference | prediction pair, the
    reference outlined on the prediction. One slice, or one list entry per row (``row_titles`` label them).

    ``aspect``: physical height / width of one pixel (row spacing / column spacing).
    """
    refs = ref2d if isinstance(ref2d, list) else [ref2d]
    preds = pred2d if isinstance(pred2d, list) else [pred2d]
    images = image2d if isinstance(image2d, list) else [image2d] * len(refs)
    if not len(refs) == len(preds) == len(images) or row_titles is not None and len(row_titles) != len(refs):
        raise ValueError(f"one reference, prediction, image (and row title) per row: got {len(refs)}, "
                         f"{len(preds)}, {len(images)}" + ("" if row_titles is None else f", {len(row_titles)}"))
    values = [v for _, v in labels]
    colors = [_COLORS[i % len(_COLORS)] for i in range(len(values))]
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*c, 1.0) for c in colors])

    fig = Figure(figsize=(10, 1.0 + 4.4 * len(refs)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(refs), 2, squeeze=False)
    for row, (ref, pred, image) in enumerate(zip(refs, preds, images)):
        ref_idx = _class_index_map(ref, values)
        pred_idx = _class_index_map(pred, values)
        for col, (idx, name) in enumerate(((ref_idx, "reference"), (pred_idx, "prediction, reference outlined"))):
            ax = axes[row, col]
            if image is not None:
                lo, hi = _display_range(image)
                ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", aspect=aspect)
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
            # wrapped, so that the two panels' titles never run into each other
            ax.set_title(name if row_titles is None else textwrap.fill(f"{row_titles[row]}: {name}", 48),
                         fontsize=9)
            ax.set_axis_off()
    handles = []
    for (n, v), c in zip(labels, colors):
        text = f"{n} ({v})" + (f" Dice {dice[n]:.3f}" if dice is not None and n in dice else "")
        handles.append(Patch(color=c, label=text))
    handles.append(Line2D([], [], color="0.5", linewidth=1.0, label="outline: reference"))
    fig.legend(handles=handles, loc="lower center", ncol=min(5, max(1, len(handles))), fontsize=8)
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
) -> list[int]:
    """Read one case and write its overlay PNG; returns the slice indices shown: the one with the most
    reference foreground, then the one with the most errors (only when it is another slice with errors)."""
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
    values = [v for _, v in labels]
    z = choose_slice(ref, pred, values)
    z_err, n_err = error_slice(ref, pred, values)
    rows, row_titles = [z], [f"slice {z}, most reference foreground"]
    if n_err == 0:
        row_titles[0] += ", no error in any slice"
    elif z_err == z:
        row_titles[0] += f" and most errors ({n_err} voxels)"
    else:
        rows.append(z_err)
        row_titles.append(f"slice {z_err}, most errors ({n_err} voxels FP + FN)")
    render_slice_overlay(
        out_path,
        [ref[i] for i in rows],
        [pred[i] for i in rows],
        labels,
        [None if image is None else image[i] for i in rows],
        title=title,
        dice=dice,
        aspect=spacing[-2] / spacing[-1] if len(spacing) >= 2 else 1.0,
        row_titles=row_titles,
    )
    return rows
