"""Synthetic demo tasks written as standard nnU-Net v2 raw datasets.

Every task is a 3D phantom family: CT-like torsos (air, fat, soft tissue, spine in Hounsfield units) or
MR-like volumes (arbitrary scale, per-case gain, smooth multiplicative bias field, Rician noise) with one
or more labeled structures whose shape, position, size and contrast vary per case. Each dataset holds
labeled training cases (imagesTr/labelsTr), unlabeled images (imagesUnlabeled) and labeled held-out test
cases (imagesTs/labelsTs). Geometry is in millimetres, so shapes stay physically round at anisotropic
spacing and ``scale`` changes only the resolution, never the anatomy.

Presets: ``demo`` (three small tasks, ids 901-903), ``paper`` (four tasks shaped like the VerSemi
paper's Pancreas-CT, LA, Spleen and Lung tumour datasets, scaled down for CPU, ids 911-914) and ``hard``
(three tasks with headroom for few labels: low target contrast, distractors whose intensity overlaps the
target's, contrast that changes sign between cases, a small second class, anisotropic and differing
spacings; ids 921-923; calibrated in docs/DEMO_DATA.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

FILE_ENDING = ".nii.gz"
UNLABELED_FOLDER = "imagesUnlabeled"
# Splits in the order their case ids are numbered; the code keys each case's random stream, so a case's
# content does not depend on how many cases the other splits have.
_SPLITS = (("labeled", 0), ("unlabeled", 1), ("test", 2))
_MIN_VOXELS_PER_CLASS = 4
_LOBE_SPREAD = 0.6  # lobe offsets, in radii: enough to make shapes irregular, not detached


# ---- geometry -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """Voxel grid of one image; ``coords`` are broadcastable (z, y, x) voxel-centre positions in mm,
    centred on the image, which is also the physical position written to the file (identity direction)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def half(self) -> np.ndarray:
        return np.asarray(self.shape) * np.asarray(self.spacing) / 2

    @property
    def coords(self) -> list[np.ndarray]:
        return [
            (np.arange(n) - (n - 1) / 2).reshape([-1 if a == i else 1 for a in range(3)]) * s
            for i, (n, s) in enumerate(zip(self.shape, self.spacing))
        ]

    @property
    def origin(self) -> np.ndarray:
        return np.array([c.ravel()[0] for c in self.coords])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _frame(rng: np.random.Generator, axis: np.ndarray) -> np.ndarray:
    """Orthonormal rows whose first row is ``axis``: orients an ellipsoid's long axis."""
    axis = axis / np.linalg.norm(axis)
    other = rng.normal(size=3)
    other -= other.dot(axis) * axis
    other /= np.linalg.norm(other)
    return np.stack([axis, other, np.cross(axis, other)])


def _ellipsoid(grid: Grid, center, radii, rotation: np.ndarray | None = None) -> np.ndarray:
    """Voxels inside an ellipsoid (mm). An infinite radius gives a cylinder along that axis."""
    d = [c - m for c, m in zip(grid.coords, center)]
    if rotation is not None:
        d = [sum(rotation[i, j] * d[j] for j in range(3)) for i in range(3)]
    inside = sum((di / r) ** 2 for di, r in zip(d, radii))
    return np.broadcast_to(inside <= 1, grid.shape).copy()


def _lobed_blob(
    rng: np.random.Generator,
    grid: Grid,
    center: np.ndarray,
    radius: float,
    lobes: int,
    spread: float = _LOBE_SPREAD,
    elongation: float = 0.2,
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Union of randomly rotated ellipsoids: an irregular organ. With ``direction`` the lobes form a
    chain along it (pancreas-like) instead of clustering around the centre."""
    mask = np.zeros(grid.shape, bool)
    for k in range(lobes):
        if direction is None:
            offset = rng.normal(size=3) * spread * radius / np.sqrt(3) if k else np.zeros(3)
        else:
            offset = direction * spread * radius * (k - (lobes - 1) / 2) + rng.normal(size=3) * 0.15 * radius
        size = radius * (1.0 if k == 0 else rng.uniform(0.55, 0.85))
        radii = size * rng.uniform(1 - elongation, 1 + elongation, 3)
        mask |= _ellipsoid(grid, center + offset, radii, _random_rotation(rng))
    return mask


def _depth(grid: Grid, mask: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it or to the image border."""
    padded = np.pad(mask, 1)
    return ndimage.distance_transform_edt(padded, sampling=grid.spacing)[1:-1, 1:-1, 1:-1]


def _place(rng: np.random.Generator, grid: Grid, region: np.ndarray, margin: float) -> np.ndarray:
    """A random point (mm) of ``region`` at least ``margin`` mm from its edge (its deepest point if none is)."""
    depth = _depth(grid, region)
    candidates = np.flatnonzero(depth >= margin)
    flat = rng.choice(candidates) if len(candidates) else int(np.argmax(depth))
    index = np.unravel_index(flat, grid.shape)
    jitter = rng.uniform(-0.5, 0.5, 3) * np.asarray(grid.spacing)
    return np.array([c.ravel()[i] for c, i in zip(grid.coords, index)]) + jitter


def _inner_blob(rng: np.random.Generator, grid: Grid, region: np.ndarray, radius: float) -> np.ndarray:
    """A small blob strictly inside ``region``: a lesion in an organ or a tumour in a lung. Clipping to
    the region's interior keeps even diagonal neighbours of the blob inside the region."""
    keep_off = float(np.linalg.norm(grid.spacing))
    center = _place(rng, grid, region, radius + keep_off)
    blob = _lobed_blob(rng, grid, center, radius, lobes=2, spread=0.4)
    return blob & (_depth(grid, region) > keep_off)


def _smooth_noise(rng: np.random.Generator, grid: Grid, sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-std, spatially correlated noise: tissue texture."""
    field = ndimage.gaussian_filter(rng.normal(size=grid.shape), np.divide(sigma_mm, grid.spacing))
    return (field - field.mean()) / (field.std() + 1e-8)


def _bias_field(rng: np.random.Generator, grid: Grid, strength: float) -> np.ndarray:
    """Smooth multiplicative MR bias: exp of a random quadratic polynomial over the image."""
    u = [c / h for c, h in zip(grid.coords, grid.half)]
    terms = [*u, u[0] * u[1], u[0] * u[2], u[1] * u[2], *(x**2 for x in u)]
    log_field = sum(rng.normal(0, strength) * t for t in terms)
    return np.exp(np.broadcast_to(log_field, grid.shape))


# ---- intensity models -----------------------------------------------------------------------------------
def _ct_torso(rng: np.random.Generator, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Air, an elliptic body (fat rim, soft tissue inside) and a posterior spine, in HU.
    Returns the image and the soft-tissue region away from the spine where organs may go."""
    hy, hx = grid.half[1:]
    center = np.array([0.0, rng.uniform(-0.05, 0.05) * hy, rng.uniform(-0.05, 0.05) * hx])
    body_r = np.array([np.inf, rng.uniform(0.8, 0.92) * hy, rng.uniform(0.86, 0.96) * hx])
    inner_r = body_r - [0, *[rng.uniform(2.5, 5.0)] * 2]
    spine_c = center + [0, 0.62 * inner_r[1], rng.uniform(-1.0, 1.0)]
    spine_r = rng.uniform(0.12, 0.16) * hy
    hu = np.full(grid.shape, -1000.0)
    hu[_ellipsoid(grid, center, body_r)] = rng.normal(-100, 8)
    inner = _ellipsoid(grid, center, inner_r)
    hu[inner] = rng.normal(40, 5)
    hu[_ellipsoid(grid, spine_c, (np.inf, spine_r, spine_r))] = rng.normal(700, 60)
    return hu, inner & ~_ellipsoid(grid, spine_c, (np.inf, spine_r + 3, spine_r + 3))


def _ct_finish(rng: np.random.Generator, grid: Grid, hu: np.ndarray) -> np.ndarray:
    hu = hu + 6 * _smooth_noise(rng, grid, 2.0) + rng.normal(0, rng.uniform(8, 20), grid.shape)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def _mr_finish(rng: np.random.Generator, grid: Grid, signal: np.ndarray) -> np.ndarray:
    signal = signal * (1 + 0.06 * _smooth_noise(rng, grid, 2.0)) * _bias_field(rng, grid, 0.12)
    signal *= rng.uniform(0.6, 1.4)  # per-case scanner gain: MR has no absolute intensity scale
    sd = rng.uniform(12, 30)
    # magnitude images carry Rician noise, which keeps the background positive and biased
    noisy = np.hypot(signal + rng.normal(0, sd, grid.shape), rng.normal(0, sd, grid.shape))
    return noisy.astype(np.float32)


# ---- phantoms: (rng, grid) -> (image, label) ------------------------------------------------------------
Phantom = Callable[[np.random.Generator, Grid], tuple[np.ndarray, np.ndarray]]


def _organ_region(grid: Grid, free: np.ndarray, side: int) -> np.ndarray:
    """Restrict organ placement to one patient side (+1: +x, -1: -x, 0: anywhere)."""
    return free & (grid.coords[2] * side >= 0) if side else free


def _ct_organ(
    rng: np.random.Generator,
    grid: Grid,
    radius: tuple[float, float],
    contrast: tuple[float, float],
    lobes: tuple[int, int] = (2, 3),
    chain: bool = False,
    side: int = 0,
    lesion: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """CT torso with one organ (label 1) brighter than soft tissue, optionally holding a hypodense
    lesion (label 2)."""
    hu, free = _ct_torso(rng, grid)
    r = rng.uniform(*radius)
    n = int(rng.integers(lobes[0], lobes[1] + 1))
    direction = None
    if chain:  # mostly left-right, like a pancreas running from head to tail
        direction = np.array([rng.normal(0, 0.2), rng.normal(0, 0.3), 1.0])
        direction /= np.linalg.norm(direction)
    # a chain reaches (1 + spread * (n - 1) / 2) radii from its centre; keep that much room
    margin = r * (1 + _LOBE_SPREAD * (n - 1) / 2) if chain else r
    center = _place(rng, grid, _organ_region(grid, free, side), margin)
    organ = _lobed_blob(rng, grid, center, r, n, direction=direction) & free
    hu[organ] = hu[organ] + rng.uniform(*contrast)
    label = organ.astype(np.uint8)
    if lesion is not None:
        spot = _inner_blob(rng, grid, organ, rng.uniform(*lesion))
        hu[spot] -= rng.uniform(40, 70)
        label[spot] = 2
    return _ct_finish(rng, grid, hu), label


def _ct_lung_tumour(
    rng: np.random.Generator, grid: Grid, radius: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """CT thorax: two air-filled lungs in the torso, a soft-tissue tumour (label 1) inside one of them."""
    hu, free = _ct_torso(rng, grid)
    hz, hy, hx = grid.half
    lungs = []
    for side in (-1, 1):
        c = np.array([rng.uniform(-0.1, 0.1) * hz, -0.05 * hy, side * rng.uniform(0.44, 0.5) * hx])
        radii = np.array([1.3 * hz, rng.uniform(0.45, 0.55) * hy, rng.uniform(0.26, 0.32) * hx])
        lungs.append(_ellipsoid(grid, c, radii, _frame(rng, np.array([1.0, *rng.normal(0, 0.08, 2)]))) & free)
        hu[lungs[-1]] = rng.normal(-850, 30)
    tumour = _inner_blob(rng, grid, lungs[int(rng.integers(2))], rng.uniform(*radius))
    hu[tumour] = rng.normal(30, 15)
    return _ct_finish(rng, grid, hu), tumour.astype(np.uint8)


def _mr_chamber(
    rng: np.random.Generator, grid: Grid, radius: tuple[float, float], veins: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """MR volume: tissue ellipsoid with a bright blood-pool chamber (label 1), optionally with vein stubs
    (left atrium with pulmonary veins)."""
    signal = np.zeros(grid.shape)
    body = _ellipsoid(grid, rng.normal(0, 1.0, 3), grid.half * rng.uniform(0.82, 0.95, 3))
    signal[body] = rng.normal(280, 30)
    r = rng.uniform(*radius)
    center = _place(rng, grid, body, 1.3 * r)
    chamber = _lobed_blob(rng, grid, center, r, int(rng.integers(2, 4)), spread=0.5)
    for _ in range(int(rng.integers(veins[0], veins[1] + 1))):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        vein_r = rng.uniform(0.18, 0.25) * r
        chamber |= _ellipsoid(grid, center + axis * 1.1 * r, (0.8 * r, vein_r, vein_r), _frame(rng, axis))
    chamber &= body
    # a darker wall around the blood pool, as myocardium around a cardiac chamber
    wall = ndimage.binary_dilation(chamber, iterations=1) & body & ~chamber
    signal[wall] *= 0.7
    signal[chamber] = rng.normal(900, 80)
    return _mr_finish(rng, grid, signal), chamber.astype(np.uint8)


# ---- hard phantoms: what two labeled cases do not cover ---------------------------------------------------
#: appearance modes of a hard target: enhancing, hypodense, or iso-intense inside a bright rim (as between
#: contrast phases and sequences); two labeled cases never show all three
_MODES = ("bright", "dark", "rim")


def _paint(rng: np.random.Generator, grid: Grid, image: np.ndarray, mask: np.ndarray, mode: str,
           contrast: float) -> None:
    """Add ``contrast`` to ``mask`` in ``image`` as ``mode`` says (rim: a 1.5 mm shell, interior unchanged)."""
    if mode == "rim":
        shell = mask & (_depth(grid, mask) <= max(1.5, min(grid.spacing[1:])))
        image[shell] += contrast
    else:
        image[mask] += contrast if mode == "bright" else -contrast


def _distractors(
    rng: np.random.Generator, grid: Grid, free: np.ndarray, count: tuple[int, int], radius: tuple[float, float]
) -> list[np.ndarray]:
    """Round blobs in ``free`` that are not the target: what a model must learn to leave out."""
    blobs = []
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        r = rng.uniform(*radius)
        blobs.append(_ellipsoid(grid, _place(rng, grid, free, r), r * rng.uniform(0.9, 1.1, 3)) & free)
        free = free & ~ndimage.binary_dilation(blobs[-1], iterations=2)
    return blobs


def _ct_organ_modes(
    rng: np.random.Generator,
    grid: Grid,
    radius: tuple[float, float],
    contrast: tuple[float, float],
    modes: tuple[str, ...] = _MODES,
    lesion: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """CT torso with a lobed organ (label 1) in one of ``modes`` per case and smaller round distractors drawn
    from the same modes and contrasts: a few labeled cases show only part of the organ's appearance, and
    intensity alone does not separate it from the distractors (size and shape do). With ``lesion`` the organ
    holds a small hypodense spot (label 2)."""
    hu, free = _ct_torso(rng, grid)
    r = rng.uniform(*radius)
    center = _place(rng, grid, free, 1.2 * r)
    organ = _lobed_blob(rng, grid, center, r, int(rng.integers(2, 4)), spread=0.5, elongation=0.3) & free
    room = free & ~ndimage.binary_dilation(organ, iterations=3)
    for blob in _distractors(rng, grid, room, (1, 2), (0.35 * radius[0], 0.5 * radius[0])):
        _paint(rng, grid, hu, blob, modes[int(rng.integers(len(modes)))], rng.uniform(*contrast))
    _paint(rng, grid, hu, organ, modes[int(rng.integers(len(modes)))], rng.uniform(*contrast))
    label = organ.astype(np.uint8)
    if lesion is not None:
        spot = _inner_blob(rng, grid, organ, rng.uniform(*lesion))
        hu[spot] = rng.normal(0, 8)  # water-like, whatever the organ's mode
        label[spot] = 2
    return _ct_finish(rng, grid, hu), label


def _mr_gland(
    rng: np.random.Generator, grid: Grid, radius: tuple[float, float], contrast: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """MR pelvis-like volume: a gland (label 1) brighter, darker, or iso-intense inside a bright rim (one mode
    per case), under a bias field, beside a large bright bladder-like distractor and smaller darker muscles."""
    signal = np.zeros(grid.shape)
    body = _ellipsoid(grid, rng.normal(0, 1.0, 3), grid.half * rng.uniform(0.85, 0.97, 3))
    tissue = rng.normal(300, 30)
    signal[body] = tissue
    r = rng.uniform(*radius)
    gland = _lobed_blob(rng, grid, _place(rng, grid, body, 1.2 * r), r, 2, spread=0.4, elongation=0.3) & body
    free = body & ~ndimage.binary_dilation(gland, iterations=3)
    bladder, *muscles = _distractors(rng, grid, free, (2, 3), (0.4 * radius[0], 0.6 * radius[0]))
    signal[bladder] = tissue * rng.uniform(2.0, 2.5)
    for m in muscles:
        signal[m] = tissue * (1 - rng.uniform(*contrast))
    _paint(rng, grid, signal, gland, _MODES[int(rng.integers(3))], tissue * rng.uniform(*contrast))
    signal = signal * (1 + 0.05 * _smooth_noise(rng, grid, 1.5)) * _bias_field(rng, grid, 0.15)
    signal *= rng.uniform(0.6, 1.4)
    sd = rng.uniform(8, 16)
    image = np.hypot(signal + rng.normal(0, sd, grid.shape), rng.normal(0, sd, grid.shape))
    return image.astype(np.float32), gland.astype(np.uint8)


# ---- tasks and presets ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """One synthetic dataset. ``shape`` (voxels) and ``spacing`` (mm) are (z, y, x) at scale 1."""

    name: str
    channel_name: str
    labels: tuple[str, ...]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    phantom: Phantom
    description: str

    def grid(self, scale: float = 1.0) -> Grid:
        """Grid at ``scale``: more voxels over the same field of view, so anatomy stays the same size."""
        shape = tuple(max(8, round(n * scale)) for n in self.shape)
        spacing = tuple(round(n * s / m, 4) for n, s, m in zip(self.shape, self.spacing, shape))
        return Grid(shape, spacing)


PRESETS: dict[str, dict] = {
    "demo": {
        "first_id": 901,
        "counts": {"labeled": 8, "unlabeled": 8, "test": 4},
        "tasks": [
            TaskSpec(
                "DemoCT",
                "CT",
                ("organ",),
                (24, 40, 40),
                (2.5, 1.5, 1.5),
                partial(_ct_organ, radius=(5.0, 8.0), contrast=(60, 90)),
                "CT-like torso (HU) with an irregular organ",
            ),
            TaskSpec(
                "DemoMR",
                "MRI",
                ("chamber",),
                (32, 32, 32),
                (1.25, 1.25, 1.25),
                partial(_mr_chamber, radius=(5.0, 8.0)),
                "MR-like volume (arbitrary scale, bias field) with a blood-pool chamber",
            ),
            TaskSpec(
                "DemoMC",
                "CT",
                ("organ", "lesion"),
                (20, 36, 36),
                (3.0, 1.25, 1.25),
                partial(_ct_organ, radius=(8.0, 11.0), contrast=(50, 80), lesion=(3.0, 4.5)),
                "CT-like torso with an organ containing a hypodense lesion",
            ),
        ],
    },
    "paper": {
        "first_id": 911,
        "counts": {"labeled": 8, "unlabeled": 24, "test": 4},
        "tasks": [
            TaskSpec(
                "PaperPancreas",
                "CT",
                ("pancreas",),
                (24, 48, 48),
                (2.5, 1.0, 1.0),
                partial(_ct_organ, radius=(3.5, 5.0), contrast=(20, 40), lobes=(3, 4), chain=True),
                "Pancreas-CT-like: small low-contrast elongated organ in the abdomen, anisotropic spacing",
            ),
            TaskSpec(
                "PaperLA",
                "MRI",
                ("left_atrium",),
                (32, 40, 40),
                (1.0, 1.0, 1.0),
                partial(_mr_chamber, radius=(7.0, 10.0), veins=(2, 4)),
                "LA-like MR: left-atrium blood pool with pulmonary vein stubs, isotropic spacing",
            ),
            TaskSpec(
                "PaperSpleen",
                "CT",
                ("spleen",),
                (20, 40, 40),
                (4.0, 1.5, 1.5),
                partial(_ct_organ, radius=(7.0, 10.0), contrast=(70, 100), side=1),
                "Spleen-like CT: bright lateral organ, thick slices",
            ),
            TaskSpec(
                "PaperLung",
                "CT",
                ("tumour",),
                (24, 40, 40),
                (2.0, 1.25, 1.25),
                partial(_ct_lung_tumour, radius=(2.5, 5.0)),
                "Lung-tumour-like CT: small soft-tissue tumour in an air-filled lung",
            ),
        ],
    },
    "hard": {
        "first_id": 921,
        "counts": {"labeled": 20, "unlabeled": 20, "test": 12},
        "tasks": [
            TaskSpec(
                "HardOrganCT",
                "CT",
                ("organ",),
                (24, 48, 48),
                (2.0, 1.0, 1.0),
                partial(_ct_organ_modes, radius=(6.0, 9.0), contrast=(70, 110)),
                "CT-like torso: lobed organ, enhancing, hypodense or rim-enhancing, among smaller round "
                "distractors of the same appearances",
            ),
            TaskSpec(
                "HardKidneyCT",
                "CT",
                ("kidney", "cyst"),
                (16, 48, 48),
                (4.0, 1.25, 1.25),
                partial(_ct_organ_modes, radius=(9.0, 12.0), contrast=(70, 110), modes=("bright", "rim"),
                        lesion=(4.5, 6.5)),
                "CT-like torso with 4 mm slices: organ (enhancing or rim-enhancing) holding a small water-like "
                "cyst, smaller distractors",
            ),
            TaskSpec(
                "HardProstateMR",
                "MRI",
                ("gland",),
                (16, 48, 48),
                (3.0, 0.8, 0.8),
                partial(_mr_gland, radius=(7.0, 10.0), contrast=(0.3, 0.5)),
                "MR-like pelvis: gland brighter, darker or rim-bright against its surroundings, bias field, "
                "bright bladder and dark muscle distractors",
            ),
        ],
    },
}


def _case_rng(seed: int, task: TaskSpec, split: int, index: int) -> np.random.Generator:
    # keyed by the task name (not its id), so --first-id does not change the images
    return np.random.default_rng([seed, zlib.crc32(task.name.encode()), split, index])


def make_case(task: TaskSpec, seed: int, split: int, index: int, scale: float = 1.0):
    """One case of ``task`` as (image, uint8 label, grid); redraws until every class has foreground."""
    rng = _case_rng(seed, task, split, index)
    grid = task.grid(scale)
    for _ in range(20):
        image, label = task.phantom(rng, grid)
        counts = np.bincount(label.ravel(), minlength=len(task.labels) + 1)
        if len(counts) == len(task.labels) + 1 and (counts[1:] >= _MIN_VOXELS_PER_CLASS).all():
            return image, label.astype(np.uint8), grid
    raise RuntimeError(
        f"{task.name}: could not draw a case with every class present (split {split}, {index})"
    )


def _write(array: np.ndarray, grid: Grid, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    # SimpleITK orders geometry (x, y, z); the arrays and Grid are (z, y, x)
    image.SetSpacing([float(s) for s in grid.spacing[::-1]])
    image.SetOrigin([float(o) for o in grid.origin[::-1]])
    image.SetDirection(np.eye(3).ravel().tolist())
    sitk.WriteImage(image, str(path), useCompression=True)


def _dataset_json(task: TaskSpec, counts: dict[str, int], preset: str, seed: int, grid: Grid) -> dict:
    return {
        "name": task.name,
        "description": f"Synthetic: {task.description}",
        "reference": "nnunetv2_versemi demo phantoms (nnUNetv2_versemi_demo_data)",
        "licence": "CC0",
        "channel_names": {"0": task.channel_name},
        "labels": {"background": 0, **{name: i + 1 for i, name in enumerate(task.labels)}},
        "numTraining": counts["labeled"],
        "numTest": counts["test"],
        "numUnlabeled": counts["unlabeled"],
        "file_ending": FILE_ENDING,
        "versemi_demo": {
            "preset": preset,
            "seed": seed,
            "shape": list(grid.shape),
            "spacing": list(grid.spacing),
            "unlabeled_folder": UNLABELED_FOLDER,
        },
    }


def _write_dataset(
    task: TaskSpec, name: str, folder: Path, counts: dict[str, int], preset: str, seed: int, scale: float
) -> None:
    folders = {
        "labeled": ("imagesTr", "labelsTr"),
        "unlabeled": (UNLABELED_FOLDER, None),
        "test": ("imagesTs", "labelsTs"),
    }
    for pair in folders.values():
        for sub in filter(None, pair):
            (folder / sub).mkdir()
    total = sum(counts.values())
    width = max(3, len(str(total - 1)))
    number = 0
    with tqdm(total=total, desc=name, unit="case") as bar:
        for split_name, split in _SPLITS:
            image_dir, label_dir = folders[split_name]
            for index in range(counts[split_name]):
                image, label, grid = make_case(task, seed, split, index, scale)
                case = f"case_{number:0{width}d}"
                _write(image, grid, folder / image_dir / f"{case}_0000{FILE_ENDING}")
                if label_dir:
                    _write(label, grid, folder / label_dir / f"{case}{FILE_ENDING}")
                number += 1
                bar.update()
    meta = _dataset_json(task, counts, preset, seed, task.grid(scale))
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def generate_demo_datasets(
    output_dir: str | os.PathLike,
    preset: str = "demo",
    seed: int = 0,
    num_labeled: int | None = None,
    num_unlabeled: int | None = None,
    num_test: int | None = None,
    scale: float = 1.0,
    first_id: int | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write the preset's tasks as nnU-Net raw datasets into ``output_dir``; returns their folder names.

    Counts default to the preset's; ``scale`` multiplies voxels per axis over the same field of view.
    Everything is checked before anything is written; each dataset is built in a temporary folder and
    renamed into place, so a failure leaves no half-written dataset.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    given = {"labeled": num_labeled, "unlabeled": num_unlabeled, "test": num_test}
    counts = {k: spec["counts"][k] if v is None else int(v) for k, v in given.items()}
    if counts["labeled"] < 1 or counts["unlabeled"] < 0 or counts["test"] < 0:
        raise ValueError(f"need at least 1 labeled case and non-negative counts, got {counts}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    first_id = spec["first_id"] if first_id is None else int(first_id)
    if first_id < 1:
        raise ValueError(f"first_id must be positive, got {first_id}")

    output = Path(output_dir)
    names = [f"Dataset{first_id + i:03d}_{t.name}" for i, t in enumerate(spec["tasks"])]
    _check_targets(output, names, overwrite)

    output.mkdir(parents=True, exist_ok=True)
    for task, name in zip(spec["tasks"], names):
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=output))
        try:
            _write_dataset(task, name, tmp, counts, preset, int(seed), scale)
            target = output / name
            if target.exists():  # only reachable with overwrite=True (checked above)
                # move the old dataset aside first, so the target name is never left without a dataset
                old = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=output))
                target.rename(old / name)
                tmp.rename(target)
                shutil.rmtree(old)
            else:
                tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return names


def _check_targets(output: Path, names: list[str], overwrite: bool) -> None:
    """Refuse existing folders (unless overwrite) and any other folder using the same dataset id, which
    would make nnU-Net's id lookup ambiguous."""
    existing = [p.name for p in output.iterdir() if p.is_dir()] if output.is_dir() else []
    for name in names:
        prefix = name.split("_")[0] + "_"
        clashes = [e for e in existing if e.startswith(prefix) and e != name]
        if clashes:
            raise FileExistsError(
                f"{output / clashes[0]} already uses the id of {name}; choose other ids with --first-id"
            )
        if name in existing and not overwrite:
            raise FileExistsError(f"{output / name} already exists; pass --overwrite to replace it")
