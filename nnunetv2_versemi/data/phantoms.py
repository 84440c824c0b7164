"""The phantom families of the demo data: CT-like torsos and MR-like volumes, in millimetres on a voxel grid,
with the organs, lesions, glands and distractors the presets of ``demo_data`` draw per case. Each family is a
function ``(rng, grid) -> (image, label)``; its random stream is the case's, so a case is the same on every
machine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

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


def ct_organ(
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


def ct_lung_tumour(
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


def mr_chamber(
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


def ct_organ_modes(
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


def mr_gland(
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
