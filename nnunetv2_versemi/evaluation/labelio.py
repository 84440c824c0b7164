"""Reading label maps and finding images for evaluation and its overlays (nnU-Net's readers, any format)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.imageio import geometry_of, read_checked, supported_endings

_NOT_LABEL_FILES = {"dataset.json", "plans.json", "predict_from_raw_data_args.json"}


class EvaluationError(VerSemiInputError):
    """Bad input to the evaluation: missing or mismatched files, unknown task or case."""


def split_ending(filename: str, endings: list[str]) -> tuple[str, str] | None:
    for e in endings:
        if filename.lower().endswith(e):
            return filename[: -len(e)], filename[-len(e) :]
    return None


def list_label_files(folder: str | os.PathLike, file_ending: str | None = None) -> tuple[dict[str, str], str]:
    """``({case id: path}, file ending)`` of the label maps in ``folder`` (top level only).

    Without ``file_ending`` the ending is detected among the formats nnU-Net reads; a folder mixing
    formats needs an explicit one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"Folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in _NOT_LABEL_FILES)
    if file_ending is None:
        endings = supported_endings()
        found = {}
        for p in files:
            split = split_ending(p.name, endings)
            if split is not None:
                found.setdefault(split[1].lower(), []).append(p.name)
        if not found:
            raise EvaluationError(
                f"{folder} holds no label files in a format nnU-Net reads ({', '.join(endings)})"
            )
        if len(found) > 1:
            raise EvaluationError(
                f"{folder} mixes file formats ({', '.join(sorted(found))}); choose one with --file-ending"
            )
        file_ending = next(iter(found))
    cases = {
        p.name[: -len(file_ending)]: str(p) for p in files if p.name.lower().endswith(file_ending.lower())
    }
    if not cases:
        raise EvaluationError(f"{folder} holds no files ending in {file_ending}")
    return cases, file_ending


def find_image(images_dir: str | os.PathLike, case: str) -> str | None:
    """The first channel ``CASE_0000.<ending>`` of a case in ``images_dir``, or None."""
    images_dir = Path(images_dir)
    endings = supported_endings()
    for e in endings:
        f = images_dir / f"{case}_0000{e}"
        if f.is_file():
            return str(f)
    return None


def read_label_map(path: str) -> tuple[np.ndarray, dict]:
    """Label map (nnU-Net axis order, channel axis removed) and its geometry (``spacing`` per axis in mm,
    ``origin``, ``direction``; see :func:`nnunetv2_versemi.imageio.geometry_of`)."""
    try:
        seg, props, _ = read_checked(path, "seg")
    except ValueError as e:
        raise EvaluationError(f"Cannot read label file {path}: {e}") from e
    seg = np.asarray(seg[0])
    if np.issubdtype(seg.dtype, np.floating) and not np.all(np.isfinite(seg)):
        raise EvaluationError(f"{path} holds NaN or infinite values; expected a label map")
    rounded = np.rint(seg)
    if not np.array_equal(rounded, seg):
        raise EvaluationError(f"{path} holds non-integer values; expected a label map")
    if rounded.size and (rounded.min() < np.iinfo(np.int32).min or rounded.max() > np.iinfo(np.int32).max):
        raise EvaluationError(f"{path} holds values beyond the 32-bit integer range; expected a label map")
    return rounded.astype(np.int32), geometry_of(props)


def resample_to_reference(pred_file: str, ref_file: str) -> np.ndarray:
    """The prediction's labels resampled (nearest neighbour, physical coordinates) into the reference's voxel
    grid: for ``--allow-geometry-mismatch`` (files SimpleITK reads)."""
    import SimpleITK as sitk

    try:
        ref, pred = sitk.ReadImage(ref_file), sitk.ReadImage(pred_file)
        out = sitk.Resample(pred, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, pred.GetPixelID())
    except RuntimeError as e:
        raise EvaluationError(f"Cannot resample {pred_file} into the geometry of {ref_file}: {e}") from e
    return np.rint(sitk.GetArrayFromImage(out)).astype(np.int32)


def read_first_channel(image_file: str) -> np.ndarray:
    """The first channel of an image file, float32, nnU-Net axis order."""
    try:
        img, _, _ = read_checked(image_file, "image")
    except ValueError as e:
        raise EvaluationError(f"Cannot read image file {image_file}: {e}") from e
    return np.asarray(img[0], dtype=np.float32)
