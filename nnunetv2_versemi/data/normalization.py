"""Per-task intensity normalization: what nnU-Net would do to each source dataset on its own.

A union dataset mixes CT (whose normalization uses dataset-wide foreground statistics) with other
modalities. If the union were planned as one dataset, nnU-Net would pool the CT statistics of all tasks
(or z-score CT). Instead, the merge normalizes each task's images with that task's own transform, writes
float32 images and declares the channel ``noNorm``; the ``--task`` predictor applies the same transform to
raw images. Both go through :func:`normalize_task_image`, which runs nnU-Net's own normalization classes.

CT statistics are those nnU-Net's ``DatasetFingerprintExtractor`` would compute for a dataset made of the
task's labeled training cases: per case, crop to the nonzero region, draw ``int(10e7 // num_cases)``
foreground intensities with replacement (``RandomState(1234)``, channel after channel), pool all draws,
then take the 0.5/99.5 percentiles, mean and std. We reproduce the identical draws but keep them as
(value, count) pairs instead of a 10^8-element array, so workers send back kilobytes instead of 400 MB.

Normalization dict (the ``normalization`` entry of a task in the task table)::

    {"scheme": "CT", "mean": m, "std": s, "lower": p00_5, "upper": p99_5}   # CTNormalization
    {"scheme": "zscore"}                # ZScoreNormalization, per image, use_mask_for_norm=False
    {"scheme": "noNorm"} / {"scheme": "rescale_to_0_1"} / {"scheme": "rgb_to_0_1"}
    {"scheme": "per_channel", "channels": [<one of the above>, ...]}   # multi-channel, mixed schemes

Deviation from stock nnU-Net, on purpose: z-score never uses the nonzero mask (stock nnU-Net switches it on
when cropping to the nonzero region shrinks a dataset's images by more than a quarter, e.g. skull-stripped
brain MR); the per-image statistics cover the whole image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nnunetv2_versemi.errors import VerSemiInputError

if TYPE_CHECKING:
    from nnunetv2_versemi.tasktable import Task

#: total foreground voxels nnU-Net's fingerprint extractor samples per dataset
#: (``DatasetFingerprintExtractor.num_foreground_voxels_for_intensitystats``)
NNUNET_FOREGROUND_SAMPLES = 10e7
#: seed nnU-Net uses for each case (``collect_foreground_intensities(seed=1234)``)
NNUNET_SAMPLING_SEED = 1234
_DRAW_CHUNK = 10_000_000  # legacy RandomState.randint yields the same stream in chunks (checked in tests)

SCHEMES = ("CT", "zscore", "noNorm", "rescale_to_0_1", "rgb_to_0_1")
_SCHEME_BY_CLASS = {
    "CTNormalization": "CT",
    "ZScoreNormalization": "zscore",
    "NoNormalization": "noNorm",
    "RescaleTo01Normalization": "rescale_to_0_1",
    "RGBTo01Normalization": "rgb_to_0_1",
}


class NormalizationError(VerSemiInputError):
    """A normalization dict is malformed or does not fit the image."""


def scheme_for_channel_name(channel_name: str) -> str:
    """The scheme nnU-Net picks for a channel name (``CT`` -> CT, ``noNorm`` -> none, unknown -> z-score)."""
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import (
        get_normalization_scheme,
    )

    cls = get_normalization_scheme(channel_name)
    if cls.__name__ not in _SCHEME_BY_CLASS:
        raise NormalizationError(
            f"nnU-Net normalization {cls.__name__} (channel '{channel_name}') is not supported"
        )
    return _SCHEME_BY_CLASS[cls.__name__]


def num_samples_per_case(num_cases: int, total: float | None = None) -> int:
    """Foreground draws per case, as in ``DatasetFingerprintExtractor.run``."""
    return int((NNUNET_FOREGROUND_SAMPLES if total is None else total) // num_cases)


def case_foreground_samples(
    images: np.ndarray, seg: np.ndarray, num_samples: int, channels: list[int] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The foreground intensities nnU-Net's fingerprint extractor draws from one case, as (values, counts).

    ``images`` (c, z, y, x) and ``seg`` (1, z, y, x) as nnU-Net's reader returns them (float32). Returns, for
    each channel in ``channels`` (default all), the sorted distinct sampled values and how often each was
    drawn; empty arrays when the case has no foreground. Same draws as
    ``DatasetFingerprintExtractor.collect_foreground_intensities``: ``rs.choice(fg, n, replace=True)`` is
    ``fg[rs.randint(0, len(fg), n)]``, and every channel consumes the same RandomState in turn.
    """
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    # crop_to_nonzero writes into the seg it receives
    data_cropped, seg_cropped, _ = crop_to_nonzero(images, np.array(seg, copy=True))
    fg_mask = seg_cropped[0] > 0
    rs = np.random.RandomState(NNUNET_SAMPLING_SEED)
    wanted = set(range(len(images)) if channels is None else channels)
    out = []
    for c in range(len(images)):
        fg = data_cropped[c][fg_mask]
        if len(fg) == 0:
            if c in wanted:
                out.append((np.zeros(0, np.float32), np.zeros(0, np.int64)))
            continue
        counts = np.zeros(len(fg), np.int64)
        left = num_samples
        while left > 0:  # channels we do not need still consume the random stream
            n = min(left, _DRAW_CHUNK)
            idx = rs.randint(0, len(fg), size=n)
            if c in wanted:
                counts += np.bincount(idx, minlength=len(fg))
            left -= n
        if c in wanted:
            values, inverse = np.unique(fg, return_inverse=True)
            drawn = np.bincount(inverse.ravel(), weights=counts).astype(np.int64)
            keep = drawn > 0  # values never drawn are not in nnU-Net's sample either (matters for min/max)
            out.append((values[keep], drawn[keep]))
    return out


def merge_samples(samples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Pool (values, counts) of several cases into one sorted (values, counts)."""
    samples = [s for s in samples if len(s[0])]
    if not samples:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    values = np.concatenate([s[0] for s in samples])
    counts = np.concatenate([s[1] for s in samples])
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, np.bincount(inverse.ravel(), weights=counts).astype(np.int64)


def _weighted_percentile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """``np.percentile(np.repeat(values, counts), q)`` (method 'linear') without expanding the array."""
    n = int(counts.sum())
    h = (n - 1) * q / 100.0
    lo = int(np.floor(h))
    g = h - lo
    cum = np.cumsum(counts)

    def at(rank: int) -> float:
        return float(values[np.searchsorted(cum, rank, side="right")])

    a, b = at(lo), at(min(lo + 1, n - 1))
    # numpy's _lerp, including its switch for t >= 0.5
    return b - (b - a) * (1 - g) if g >= 0.5 else a + (b - a) * g


def intensity_properties(values: np.ndarray, counts: np.ndarray) -> dict:
    """nnU-Net's ``foreground_intensity_properties_per_channel`` entry for pooled (values, counts)."""
    if len(values) == 0 or counts.sum() == 0:
        raise NormalizationError("No foreground voxels to compute CT statistics from")
    v = values.astype(np.float64)
    w = counts.astype(np.float64)
    n = w.sum()
    mean = float((v * w).sum() / n)
    std = float(np.sqrt((w * (v - mean) ** 2).sum() / n))
    return {
        "mean": mean,
        "median": _weighted_percentile(values, counts, 50.0),
        "std": std,
        "min": float(values[0]),
        "max": float(values[-1]),
        "percentile_99_5": _weighted_percentile(values, counts, 99.5),
        "percentile_00_5": _weighted_percentile(values, counts, 0.5),
    }


def ct_normalization(props: dict) -> dict:
    """Task-table normalization dict from nnU-Net intensity properties."""
    return {
        "scheme": "CT",
        "mean": float(props["mean"]),
        "std": float(props["std"]),
        "lower": float(props["percentile_00_5"]),
        "upper": float(props["percentile_99_5"]),
    }


def channel_normalizations(task_normalization: dict, num_channels: int) -> list[dict]:
    """One normalization dict per image channel."""
    if not isinstance(task_normalization, dict) or "scheme" not in task_normalization:
        raise NormalizationError(f"Normalization must be a dict with a 'scheme', got {task_normalization!r}")
    if task_normalization["scheme"] == "per_channel":
        chans = task_normalization.get("channels")
        if not isinstance(chans, list) or len(chans) != num_channels:
            raise NormalizationError(
                f"Per-channel normalization lists {len(chans) if isinstance(chans, list) else 'no'} channels, "
                f"the image has {num_channels}"
            )
        return chans
    return [task_normalization] * num_channels


def _normalizer(norm: dict):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
        NoNormalization,
        RescaleTo01Normalization,
        RGBTo01Normalization,
        ZScoreNormalization,
    )

    scheme = norm.get("scheme")
    if scheme == "CT":
        missing = [k for k in ("mean", "std", "lower", "upper") if k not in norm]
        if missing:
            raise NormalizationError(f"CT normalization lacks {missing}: {norm!r}")
        props = {
            "mean": norm["mean"],
            "std": norm["std"],
            "percentile_00_5": norm["lower"],
            "percentile_99_5": norm["upper"],
        }
        return CTNormalization(use_mask_for_norm=False, intensityproperties=props)
    classes = {
        "zscore": ZScoreNormalization,
        "noNorm": NoNormalization,
        "rescale_to_0_1": RescaleTo01Normalization,
        "rgb_to_0_1": RGBTo01Normalization,
    }
    if scheme not in classes:
        raise NormalizationError(f"Unknown normalization scheme {scheme!r}; expected one of {SCHEMES}")
    return classes[scheme](use_mask_for_norm=False, intensityproperties={})


def normalize_task_image(image: np.ndarray, task_normalization: dict) -> np.ndarray:
    """Normalize one image (c, z, y, x) of a task the way nnU-Net normalizes that task's dataset alone.

    Returns a new float32 array; ``image`` is not modified. Uses nnU-Net's own ``CTNormalization`` /
    ``ZScoreNormalization`` / ... classes with ``use_mask_for_norm=False``.
    """
    image = np.asarray(image)
    if image.ndim < 3:
        raise NormalizationError(
            f"Expected an image with a leading channel axis (c, z, y, x), got {image.shape}"
        )
    out = image.astype(np.float32, copy=True)
    for c, norm in enumerate(channel_normalizations(task_normalization, image.shape[0])):
        out[c] = _normalizer(norm).run(out[c])
    return out


def select_task_channels(image: np.ndarray, channel: int | None) -> np.ndarray:
    """Keep the one source channel a task was merged with (``Task.channel``), or all channels."""
    if channel is None:
        return image
    if not 0 <= channel < image.shape[0]:
        raise NormalizationError(f"Channel {channel} requested, the image has {image.shape[0]} channel(s)")
    return image[channel : channel + 1]


def prepare_raw_task_image(image: np.ndarray, task: Task) -> np.ndarray:
    """A raw source image (all source channels, as nnU-Net's reader returns it) -> the union's input."""
    return normalize_task_image(select_task_channels(image, task.channel), task.normalization)
