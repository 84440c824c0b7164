"""CutMix boxes for VerSemi's synthetic task (Lu et al., TMI 2025, Sec. III-B).

As in batchgeneratorsv2, random parameters are drawn first (:func:`draw_boxes`) and applied
deterministically afterwards (:func:`box_masks`, :func:`mix`), so image and label get the same box and
tests can fix the box.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[tuple[int, int], ...]  # (start, stop) per spatial axis


def draw_boxes(n: int, spatial_shape: Sequence[int], ratio_range: tuple[float, float],
               rng: np.random.RandomState | None = None) -> list[Box]:
    """One box per sample: side = r * patch side on every axis, r ~ U(ratio_range), uniform position."""
    lo, hi = ratio_range
    if not (0 < lo <= hi <= 1):
        raise ValueError(f"CutMix box ratio range must satisfy 0 < low <= high <= 1, got {ratio_range}")
    rng = np.random if rng is None else rng
    boxes = []
    for _ in range(n):
        r = rng.uniform(lo, hi)
        box = []
        for s in spatial_shape:
            side = min(s, max(1, int(round(r * s))))
            start = rng.randint(0, s - side + 1)
            box.append((start, start + side))
        boxes.append(tuple(box))
    return boxes


def box_masks(boxes: Sequence[Box], spatial_shape: Sequence[int], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, 1, *spatial) mask, 1 inside each sample's box and 0 elsewhere."""
    m = torch.zeros((len(boxes), 1, *spatial_shape), device=device, dtype=dtype)
    for i, box in enumerate(boxes):
        if len(box) != len(spatial_shape):
            raise ValueError(f"Box {box} has {len(box)} axes, the patch has {len(spatial_shape)}")
        m[(i, 0, *[slice(a, b) for a, b in box])] = 1
    return m


def resize_mask(mask: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a box mask to a deep-supervision scale."""
    if tuple(mask.shape[2:]) == tuple(spatial_shape):
        return mask
    return F.interpolate(mask, size=tuple(spatial_shape), mode="nearest")


def mix(outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CutMix: ``inside`` within the box (mask 1), ``outside`` elsewhere. Works for images and label maps."""
    if mask.dtype == torch.bool:
        return torch.where(mask, inside, outside)
    if outside.is_floating_point():
        return outside * (1 - mask) + inside * mask
    return torch.where(mask > 0.5, inside, outside)
