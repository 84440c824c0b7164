"""Per-case, per-class overlap and surface metrics, and their aggregates.

Metrics of one class in one case (``compute_case_metrics``):

- ``dice`` = 2|R∩P| / (|R| + |P|), ``iou`` = |R∩P| / |R∪P|, on the voxels equal to the class value.
- ``hd95``: 95th percentile of the symmetric surface distances, ``asd``: average symmetric surface
  distance, both in mm (physical spacing of the array axes) from ``medpy.metric.binary.hd95`` / ``assd``.
  medpy takes the surface as the voxels removed by one erosion with a face-connected structure.

Empty masks (R = reference, P = prediction of this class):

- R and P both empty: the prediction is correct, so ``dice = iou = 1`` and ``hd95 = asd = 0``
  (``both_empty`` is set). These count in every mean.
- exactly one empty: ``dice = iou = 0``; surface distances are undefined, so ``hd95 = asd = NaN``
  (``one_empty`` is set). NaN distances are left out of the means; the aggregates report how many
  (``n_one_empty``) and over how many cases each distance mean runs (``n``).

``fp_components``: connected components of P (face, edge and corner neighbours) that touch no voxel of R,
i.e. scattered false positives (0 when P is empty).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from medpy.metric.binary import assd as _medpy_assd
from medpy.metric.binary import hd95 as _medpy_hd95
from scipy import ndimage

METRICS = ("dice", "iou", "hd95", "asd", "fp_components")


def _normalize_spacing(spacing: Sequence[float] | float | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        return (float(spacing),) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"Spacing {spacing} has {len(spacing)} entries but the arrays have {ndim} axes")
    if any(not s > 0 for s in spacing):
        raise ValueError(f"Spacing must be positive, got {spacing}")
    return spacing


def binary_metrics(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float] | float | None = None) -> dict:
    """Metrics of one binary mask pair; see the module docstring for the empty-mask conventions."""
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if ref.shape != pred.shape:
        raise ValueError(f"Reference shape {ref.shape} differs from prediction shape {pred.shape}")
    spacing = _normalize_spacing(spacing, ref.ndim)
    n_ref = int(np.count_nonzero(ref))
    n_pred = int(np.count_nonzero(pred))
    tp = int(np.count_nonzero(ref & pred))
    out = {"n_ref": n_ref, "n_pred": n_pred, "tp": tp, "fp": n_pred - tp, "fn": n_ref - tp,
           "fp_components": false_positive_components(ref, pred)}
    if n_ref == 0 and n_pred == 0:
        out.update(dice=1.0, iou=1.0, hd95=0.0, asd=0.0, both_empty=True, one_empty=False)
    elif n_ref == 0 or n_pred == 0:
        out.update(dice=0.0, iou=0.0, hd95=math.nan, asd=math.nan, both_empty=False, one_empty=True)
    else:
        out.update(
            dice=2.0 * tp / (n_ref + n_pred),
            iou=tp / (n_ref + n_pred - tp),
            hd95=float(_medpy_hd95(pred, ref, voxelspacing=spacing)),
            asd=float(_medpy_assd(pred, ref, voxelspacing=spacing)),
            both_empty=False,
            one_empty=False,
        )
    return out


def false_positive_components(ref: np.ndarray, pred: np.ndarray) -> int:
    """Connected components of ``pred`` (full neighbourhood) without any voxel in ``ref``."""
    if not pred.any():
        return 0
    components, n = ndimage.label(pred, structure=np.ones((3,) * pred.ndim, bool))
    touching = np.unique(components[ref & pred])
    return int(n - np.count_nonzero(touching))


def compute_case_metrics(
    ref: np.ndarray, pred: np.ndarray, labels: list[int], spacing: Sequence[float] | float | None
) -> dict[int, dict]:
    """Metrics of every label value in ``labels`` for one case.

    ``ref`` and ``pred`` are integer label maps of equal shape; ``spacing`` gives the physical size of
    one voxel along each array axis (mm). A leading axis of size 1 (nnU-Net's 2D layout ``(1, H, W)``)
    is dropped with its spacing, so that 2D surfaces are measured in-plane. Voxels of values not in
    ``labels`` count as background. Returns ``{label value: binary_metrics(...)}``.
    """
    ref = np.asarray(ref)
    pred = np.asarray(pred)
    if ref.shape != pred.shape:
        raise ValueError(f"Reference shape {ref.shape} differs from prediction shape {pred.shape}")
    spacing = _normalize_spacing(spacing, ref.ndim)
    while ref.ndim > 2 and ref.shape[0] == 1:
        ref, pred, spacing = ref[0], pred[0], spacing[1:]
    return {int(v): binary_metrics(ref == v, pred == v, spacing) for v in labels}


def _stats(values: Iterable[float]) -> dict:
    """Mean, (population) std and count of the finite values; None where there are none."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def aggregate(per_case: list[dict[str, dict]]) -> dict:
    """Aggregate metrics of one task's cases.

    ``per_case`` holds, per case, ``{class name: binary_metrics(...)}`` over the same classes.
    Returns ``{"n_cases", "classes": {name: {"n", "n_both_empty", "n_one_empty", dice: {mean, std, n}, ...}},
    "mean_over_classes": {metric: {mean, std, n}}}``. ``mean_over_classes`` first averages a case's
    classes (ignoring its NaN distances), then takes mean and std over cases.
    """
    names = list(per_case[0]) if per_case else []
    classes = {}
    for name in names:
        entries = [c[name] for c in per_case]
        classes[name] = {
            "n": len(entries),
            "n_both_empty": sum(bool(e["both_empty"]) for e in entries),
            "n_one_empty": sum(bool(e["one_empty"]) for e in entries),
            **{m: _stats(e[m] for e in entries) for m in METRICS},
        }
    mean_over_classes = {}
    for m in METRICS:
        case_means = []
        for c in per_case:
            vals = [c[name][m] for name in names if not math.isnan(c[name][m])]
            case_means.append(float(np.mean(vals)) if vals else math.nan)
        mean_over_classes[m] = _stats(case_means)
    return {"n_cases": len(per_case), "classes": classes, "mean_over_classes": mean_over_classes}
