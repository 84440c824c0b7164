"""Validating the cases of a merge (pass 1): every file of every case read and checked, and the CT foreground
samples of the labeled cases turned into each task's normalization."""

from __future__ import annotations

import numpy as np

from nnunetv2_versemi.data import normalization as norm
from nnunetv2_versemi.data.merge_scan import MergeError, _Source
from nnunetv2_versemi.data.merge_select import _collapse, _Job, _schemes
from nnunetv2_versemi.imageio import (
    check_compressed_stream,
    geometry_difference,
    geometry_of,
    image_dimension,
    intensity_problem,
)


def _where(job: _Job) -> str:
    return f"Dataset {job.dataset}, case {job.source_case}"


def _read(rw, files: list[str], what: str, where: str) -> tuple[np.ndarray, dict]:
    try:
        for f in files:
            check_compressed_stream(f)
        return rw.read_images(files) if what == "image" else rw.read_seg(files[0])
    except Exception as e:  # any reader failure: name the file
        raise MergeError(f"{where}: cannot read {what} file {files[0]}: {type(e).__name__}: {e}") from e


def _validate_case(job: _Job) -> dict:
    """Read every file of a case and check it. Returns ``{"problems": [...], "samples": CT samples or None}``."""
    where = _where(job)
    problems: list[str] = []
    out = {"problems": problems, "samples": None}
    rw = job.reader()
    try:
        chans, geoms = [], []
        for f in job.images:
            arr, props = _read(rw, [f], "image", where)
            if (p := intensity_problem(arr)) is not None:
                problems.append(f"{where}: image {f} {p}")
            out["dimension"] = image_dimension(props)
            chans.append(arr)
            geoms.append((f, arr.shape, geometry_of(props)))
        for f, shape, g in geoms[1:]:
            if shape != geoms[0][1]:
                problems.append(
                    f"{where}: image {f} has shape {shape[1:]}, channel 0 ({geoms[0][0]}) {geoms[0][1][1:]}"
                )
            elif (p := geometry_difference(geoms[0][2], g)) is not None:
                problems.append(f"{where}: image {f} geometry differs from channel 0 ({geoms[0][0]}): {p}")
        if any(c.shape[0] != 1 for c in chans):
            problems.append(
                f"{where}: image files must hold one channel each, got {[c.shape[0] for c in chans]}"
            )
        if job.label is not None:
            seg, sprops = _read(rw, [job.label], "label", where)
            if seg.shape[1:] != geoms[0][1][1:]:
                problems.append(
                    f"{where}: label {job.label} has shape {seg.shape[1:]}, image {geoms[0][0]} {geoms[0][1][1:]}"
                )
            elif (p := geometry_difference(geoms[0][2], geometry_of(sprops))) is not None:
                problems.append(f"{where}: label {job.label} geometry differs from image {geoms[0][0]}: {p}")
            if not np.all(np.isfinite(seg)):
                problems.append(f"{where}: label {job.label} contains NaN or infinite values")
            else:
                found = np.unique(seg)
                non_int = found[found != np.round(found)]
                if len(non_int):
                    problems.append(
                        f"{where}: label {job.label} has non-integer values {non_int[:5].tolist()}"
                    )
                declared = set(job.declared_labels)
                undeclared = [int(v) if abs(v) < 2**62 else v for v in found.tolist()
                              if v not in declared and float(v).is_integer()][:10]
                if undeclared:
                    problems.append(
                        f"{where}: label {job.label} has values {undeclared} not declared in dataset.json "
                        f"(declared: {sorted(job.declared_labels)})"
                    )
            if not problems and job.num_samples > 0:
                images = np.vstack(chans)
                out["samples"] = norm.case_foreground_samples(images, seg, job.num_samples, _ct_channels(job))
    except MergeError as e:
        problems += e.problems
    return out


def _dimension_problems(jobs: list[_Job], results: list[dict]) -> list[str]:
    """Every image of a task must have the dimensionality of most of its training images: nnU-Net would read
    a 2d image in a 3d task as one slice of spacing 999 and train on it without a word."""
    problems = []
    for ti in sorted({j.task for j in jobs}):
        dims = [(j, r["dimension"]) for j, r in zip(jobs, results) if j.task == ti and "dimension" in r]
        train = [d for j, d in dims if j.label is not None] or [d for _, d in dims]
        if not train:
            continue
        expected = max(set(train), key=train.count)
        problems += [f"{_where(j)}: image {j.images[0]} is a {d}d image; the task's training images are {expected}d"
                     for j, d in dims if d != expected]
    return problems


def _ct_channels(job: _Job) -> list[int]:
    """Source channel indices of the task's CT channels (those that need foreground statistics)."""
    used = list(range(len(job.images))) if job.channel is None else [job.channel]
    per_channel = norm.channel_normalizations(job.normalization, len(used))
    return [c for c, d in zip(used, per_channel) if d["scheme"] == "CT"]


def _task_normalization(src: _Source, task_results: list[dict]) -> dict:
    """The task's normalization dict; CT statistics from the samples of its labeled cases."""
    per_channel, k = [], 0
    for scheme in _schemes(src):
        if scheme != "CT":
            per_channel.append({"scheme": scheme})
            continue
        values, counts = norm.merge_samples(
            [r["samples"][k] for r in task_results if r["samples"] is not None]
        )
        k += 1
        if len(values) == 0:
            raise MergeError(
                f"Dataset {src.dataset} (task {src.task}): no foreground voxel in its labeled cases; "
                "CT statistics need some"
            )
        per_channel.append(norm.ct_normalization(norm.intensity_properties(values, counts)))
    return _collapse(per_channel)
