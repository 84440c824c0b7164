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
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_versemi.data.phantoms import (
    Grid,
    Phantom,
    ct_lung_tumour,
    ct_organ,
    ct_organ_modes,
    mr_chamber,
    mr_gland,
)

FILE_ENDING = ".nii.gz"
UNLABELED_FOLDER = "imagesUnlabeled"
# Splits in the order their case ids are numbered; the code keys each case's random stream, so a case's
# content does not depend on how many cases the other splits have.
_SPLITS = (("labeled", 0), ("unlabeled", 1), ("test", 2))
_MIN_VOXELS_PER_CLASS = 4


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
                partial(ct_organ, radius=(5.0, 8.0), contrast=(60, 90)),
                "CT-like torso (HU) with an irregular organ",
            ),
            TaskSpec(
                "DemoMR",
                "MRI",
                ("chamber",),
                (32, 32, 32),
                (1.25, 1.25, 1.25),
                partial(mr_chamber, radius=(5.0, 8.0)),
                "MR-like volume (arbitrary scale, bias field) with a blood-pool chamber",
            ),
            TaskSpec(
                "DemoMC",
                "CT",
                ("organ", "lesion"),
                (20, 36, 36),
                (3.0, 1.25, 1.25),
                partial(ct_organ, radius=(8.0, 11.0), contrast=(50, 80), lesion=(3.0, 4.5)),
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
                partial(ct_organ, radius=(3.5, 5.0), contrast=(20, 40), lobes=(3, 4), chain=True),
                "Pancreas-CT-like: small low-contrast elongated organ in the abdomen, anisotropic spacing",
            ),
            TaskSpec(
                "PaperLA",
                "MRI",
                ("left_atrium",),
                (32, 40, 40),
                (1.0, 1.0, 1.0),
                partial(mr_chamber, radius=(7.0, 10.0), veins=(2, 4)),
                "LA-like MR: left-atrium blood pool with pulmonary vein stubs, isotropic spacing",
            ),
            TaskSpec(
                "PaperSpleen",
                "CT",
                ("spleen",),
                (20, 40, 40),
                (4.0, 1.5, 1.5),
                partial(ct_organ, radius=(7.0, 10.0), contrast=(70, 100), side=1),
                "Spleen-like CT: bright lateral organ, thick slices",
            ),
            TaskSpec(
                "PaperLung",
                "CT",
                ("tumour",),
                (24, 40, 40),
                (2.0, 1.25, 1.25),
                partial(ct_lung_tumour, radius=(2.5, 5.0)),
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
                partial(ct_organ_modes, radius=(6.0, 9.0), contrast=(70, 110)),
                "CT-like torso: lobed organ, enhancing, hypodense or rim-enhancing, among smaller round "
                "distractors of the same appearances",
            ),
            TaskSpec(
                "HardKidneyCT",
                "CT",
                ("kidney", "cyst"),
                (16, 48, 48),
                (4.0, 1.25, 1.25),
                partial(ct_organ_modes, radius=(9.0, 12.0), contrast=(70, 110), modes=("bright", "rim"),
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
                partial(mr_gland, radius=(7.0, 10.0), contrast=(0.3, 0.5)),
                "MR-like pelvis: gland brighter, darker or rim-bright against its surroundings, bias field, "
                "bright bladder and dark muscle distractors",
            ),
        ],
    },
}


_MAX_DRAWS = 200


def _case_rng(seed: int, task: TaskSpec, split: int, index: int) -> np.random.Generator:
    # keyed by the task name (not its id), so --first-id does not change the images
    return np.random.default_rng([seed, zlib.crc32(task.name.encode()), split, index])


def make_case(task: TaskSpec, seed: int, split: int, index: int, scale: float = 1.0):
    """One case of ``task`` as (image, uint8 label, grid); redraws until every class has foreground (a small class
    at ``--scale 0.5`` needs more than 20 draws in about one case of 2,500)."""
    rng = _case_rng(seed, task, split, index)
    grid = task.grid(scale)
    for _ in range(_MAX_DRAWS):
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
