"""Writing the cases of a merge (pass 2): each case's images normalized per task and its label remapped into
the union's label space, at the paths of the union's folders; and the union's dataset.json."""

from __future__ import annotations

import os

import numpy as np

from nnunetv2_versemi.data import normalization as norm
from nnunetv2_versemi.data.merge_scan import UNLABELED_DIR
from nnunetv2_versemi.data.merge_select import _Job
from nnunetv2_versemi.data.merge_validate import _read, _where
from nnunetv2_versemi.tasktable import TABLE_KEY, TaskTable

OUT_FILE_ENDING = ".nii.gz"


def _write_image(arr: np.ndarray, props: dict, path: str) -> None:
    import SimpleITK as sitk

    if "sitk_stuff" in props:
        spacing = tuple(props["sitk_stuff"]["spacing"])
        origin = tuple(props["sitk_stuff"]["origin"])
        direction = tuple(props["sitk_stuff"]["direction"])
    else:  # readers without ITK geometry (png, tif, nibabel): keep the spacing
        spacing = tuple(float(s) for s in props["spacing"][::-1])
        origin = direction = None
    if len(spacing) == 2:
        arr = arr[0]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
        img.SetDirection(direction)
    sitk.WriteImage(img, path, True)


def _write_case(job: _Job) -> None:
    rw = job.reader()
    where = _where(job)
    images, props = _read(rw, job.images, "image", where)
    images = norm.normalize_task_image(norm.select_task_channels(images, job.channel), job.normalization)
    for c, path in enumerate(job.out_images):
        _write_image(images[c], props, path)
    if job.out_label is not None:
        seg, _ = _read(rw, [job.label], "label", where)
        lut = np.asarray(job.lut, dtype=np.int64)
        merged = lut[seg[0].astype(np.int64)]
        _write_image(merged.astype(np.uint8 if lut.max() < 256 else np.uint16), props, job.out_label)


def _assign_outputs(jobs: list[_Job], table: TaskTable, tmp: str, num_channels: int) -> None:
    dirs = {
        "labeled": ("imagesTr", "labelsTr"),
        "unlabeled": (UNLABELED_DIR, None),
        "test": ("imagesTs", "labelsTs"),
    }
    for j in jobs:
        task = table.tasks[j.task]
        j.normalization = task.normalization
        img_dir, lab_dir = dirs[j.kind]
        j.out_images = [
            os.path.join(tmp, img_dir, f"{j.case_id}_{c:04d}{OUT_FILE_ENDING}") for c in range(num_channels)
        ]
        if lab_dir is not None and j.label is not None:
            j.out_label = os.path.join(tmp, lab_dir, j.case_id + OUT_FILE_ENDING)
            j.lut = task.source_to_merged_lut(max(j.declared_labels) + 1).tolist()
        else:
            j.label = None


def _union_dataset_json(table: TaskTable, num_channels: int, output_name: str, provenance: dict) -> dict:
    return {
        "channel_names": {str(c): "noNorm" for c in range(num_channels)},
        "labels": table.merged_label_dict(),
        "numTraining": sum(len(t.labeled) for t in table.tasks),
        "file_ending": OUT_FILE_ENDING,
        "overwrite_image_reader_writer": "SimpleITKIO",
        "name": output_name,
        "description": "VerSemi union of "
        + ", ".join(f"{t.name}={t.source_dataset}" for t in table.tasks)
        + ". Images are normalized per task (see versemi.tasks[].normalization).",
        TABLE_KEY: table.to_dict(),
        "versemi_merge": provenance,
    }
