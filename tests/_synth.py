"""Tiny synthetic nnU-Net raw datasets for the data tests (no downloads, a few KB each), and the in-memory batches
of a trainer's step."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import SimpleITK as sitk

SPACING = (0.8, 0.9, 1.5)  # sitk order (x, y, z)
ORIGIN = (-10.0, 5.0, 2.5)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def write(arr: np.ndarray, path: str, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, path, True)


def read(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _case(rs: np.random.RandomState, shape, modality: str, num_classes: int, channels: int):
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = np.array(shape) / 2 + rs.uniform(-2, 2, 3)
    r = rs.uniform(3, 5)
    d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    seg = (d < r).astype(np.uint8)
    if num_classes > 1:
        seg[(d < r) & (xx > c[2])] = 2
    imgs = []
    for ch in range(channels):
        if modality == "CT":
            img = np.full(shape, -1000, np.int16)  # air
            img[d < shape[0] / 2.2] = 0 + rs.randint(-40, 40, size=(d < shape[0] / 2.2).sum())  # body
            img[seg > 0] = 80 + rs.randint(-30, 30, size=(seg > 0).sum())  # organ
            img[seg == 2] += 300
            img.flat[rs.randint(0, img.size, 5)] = 1500  # a few bright outliers
        else:
            img = (rs.gamma(2.0, 50.0, size=shape) + 200 * (seg > 0) + 100 * (seg == 2) + 50 * ch).astype(
                np.float32
            )
        imgs.append(img)
    return imgs, seg


def make_dataset(
    raw: str,
    dataset_id: int,
    name: str,
    modality: str = "CT",
    n_train: int = 4,
    n_test: int = 0,
    n_unlabeled: int = 0,
    num_classes: int = 1,
    channels: int = 1,
    shape=(16, 16, 16),
    seed: int = 0,
    file_ending: str = ".nii.gz",
) -> str:
    """Write ``raw/DatasetXXX_name`` with imagesTr/labelsTr (+ imagesTs/labelsTs, imagesUnlabeled)."""
    folder = os.path.join(raw, f"Dataset{dataset_id:03d}_{name}")
    rs = np.random.RandomState(seed)
    for sub in (
        ["imagesTr", "labelsTr"]
        + (["imagesTs", "labelsTs"] if n_test else [])
        + (["imagesUnlabeled"] if n_unlabeled else [])
    ):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    prefix = name.lower()[:3]
    for kind, n, img_dir, lab_dir in (
        ("tr", n_train, "imagesTr", "labelsTr"),
        ("ts", n_test, "imagesTs", "labelsTs"),
        ("un", n_unlabeled, "imagesUnlabeled", None),
    ):
        for i in range(n):
            case = f"{prefix}{kind}{i:03d}"
            imgs, seg = _case(rs, shape, modality, num_classes, channels)
            for ch, img in enumerate(imgs):
                write(img, os.path.join(folder, img_dir, f"{case}_{ch:04d}{file_ending}"))
            if lab_dir:
                write(seg, os.path.join(folder, lab_dir, f"{case}{file_ending}"))
    labels = {"background": 0, "organ": 1} if num_classes == 1 else {"background": 0, "left": 1, "right": 2}
    chan_names = {str(c): ("CT" if modality == "CT" else f"MR{c}") for c in range(channels)}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(
            {
                "channel_names": chan_names,
                "labels": labels,
                "numTraining": n_train,
                "file_ending": file_ending,
            },
            f,
        )
    return folder


def make_three(raw: str, n_train=(4, 4, 3), n_unlabeled=(2, 0, 1), n_test=(1, 1, 0)) -> list[str]:
    """CT (1 class), MR (1 class), MR with 2 classes: datasets 501, 502, 503."""
    return [
        make_dataset(raw, 501, "Liver", "CT", n_train[0], n_test[0], n_unlabeled[0], seed=1),
        make_dataset(raw, 502, "Atrium", "MR", n_train[1], n_test[1], n_unlabeled[1], seed=2),
        make_dataset(raw, 503, "Kidney", "MR", n_train[2], n_test[2], n_unlabeled[2], num_classes=2, seed=3),
    ]


def tree_hash(folder: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for fn in files:
            p = os.path.join(root, fn)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def isolated_nnunet(base, mp) -> None:
    """nnUNet_raw / _preprocessed / _results under ``base`` (a pathlib.Path), and nnU-Net's fingerprint drawing
    10^5 instead of 10^8 foreground voxels (the union's channel is noNorm, so its intensity statistics are
    unused; the CT statistics of the merge likewise sample 2 x 10^5)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )

    from nnunetv2_versemi.data import normalization

    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (base / v).mkdir()
        mp.setenv(v, str(base / v))
    mp.setattr(normalization, "NNUNET_FOREGROUND_SAMPLES", 2e5)
    init = DatasetFingerprintExtractor.__init__

    def small_init(self, *a, **k):
        init(self, *a, **k)
        self.num_foreground_voxels_for_intensitystats = 1e5

    mp.setattr(DatasetFingerprintExtractor, "__init__", small_init)


def train_batches(trainer, seed: int = 0) -> tuple[dict, dict]:
    """A labeled batch (one case of each task in turn, a square of the task's first class) and an unlabeled
    batch, in the shapes nnU-Net's loaders give an initialized VerSemi trainer (targets per deep-supervision
    scale), for ``trainer.train_step`` and ``trainer.dataloader_unlabeled``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    table, ps, b = trainer.task_table, list(trainer.configuration_manager.patch_size), trainer.batch_size
    keys = [table.tasks[i % table.num_tasks].labeled[0] for i in range(b)]
    seg = torch.zeros(b, 1, *ps)
    for i, k in enumerate(keys):
        seg[i, 0, 4:12, 4:12] = table.tasks[table.task_of_case(k)].merged_values[0]
    data = torch.randn(b, 1, *ps, generator=g) + seg
    scales = trainer._get_deep_supervision_scales() or [[1.0] * len(ps)]
    target = [torch.nn.functional.interpolate(seg, scale_factor=tuple(s), mode="nearest-exact") for s in scales]
    unl = [table.tasks[i % table.num_tasks].unlabeled[0] for i in range(b)]
    return {"data": data, "target": target, "keys": keys}, {"data": torch.randn(b, 1, *ps, generator=g), "keys": unl}
