"""Where Lung's points go in the union's geometry: (1) predicted / reference tumour volume of every test case, per
labeled draw and geometry (the predictions of run_seeds.sh); (2) the tumour area of every Lung label after
nnU-Net's segmentation resampling into the union's 2d grid (order 1 as planned, and order 0), relative to the
original, in mm^2 per slice summed over the slices.

Usage: python volumes.py  (in this folder, after run_seeds.sh; nnUNet_raw as for run_seeds.sh); writes
results_volumes.json
"""
import json
import os

import numpy as np
import SimpleITK as sitk
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

from nnunetv2_versemi.tasktable import TaskTable

HERE = os.path.dirname(os.path.abspath(__file__))


def lung_values(raw: str) -> list[int]:
    table = TaskTable.from_dataset_json(json.load(open(f"{raw}/dataset.json")))
    return table.tasks[table.index("Lung")].merged_values


def predicted_volumes() -> dict:
    out = {}
    for s in range(3):
        raw = f"{os.environ['nnUNet_raw']}/Dataset{980 + s}_PaperGeoL20S{s}"
        values = lung_values(raw)
        for mode in ("own", "union"):
            pred = f"{HERE}/pred_Dataset{984 + s}_Lung{s}_{mode}"
            ratios = {}
            for f in sorted(x for x in os.listdir(pred) if x.endswith(".nii.gz")):
                p = sitk.GetArrayFromImage(sitk.ReadImage(f"{pred}/{f}")) > 0
                g = np.isin(sitk.GetArrayFromImage(sitk.ReadImage(f"{raw}/labelsTs/{f}")), values)
                ratios[f[:-7]] = round(float(p.sum() / max(g.sum(), 1)), 3)
            out[f"draw{s}_{mode}"] = {"per_case": ratios, "mean": round(float(np.mean(list(ratios.values()))), 3)}
    return out


def resampled_label_area(spacing_2d: float = 1.125) -> dict:
    raw = f"{os.environ['nnUNet_raw']}/Dataset980_PaperGeoL20S0"
    values = lung_values(raw)
    ratios = {0: [], 1: []}
    for folder in ("labelsTr", "labelsTs"):
        for f in sorted(x for x in os.listdir(f"{raw}/{folder}") if x.startswith("Lung")):
            img = sitk.ReadImage(f"{raw}/{folder}/{f}")
            lab = np.isin(sitk.GetArrayFromImage(img), values).astype(np.float32)[None]
            cur = np.array(img.GetSpacing()[::-1], float)
            shape = np.round(np.array(lab.shape[1:]) * cur / np.array([cur[0], spacing_2d, spacing_2d])).astype(int)
            new = np.array([cur[0], *(cur[1:] * np.array(lab.shape[2:]) / shape[1:])])  # the grid actually written
            for order in (0, 1):
                up = resample_data_or_seg_to_shape(lab, shape, cur, new, is_seg=True, order=order, order_z=0,
                                                   force_separate_z=None)
                ratios[order].append(float(up.sum() * np.prod(new[1:]) / (lab.sum() * np.prod(cur[1:]))))
    return {f"order_{o}": {"mean": round(float(np.mean(v)), 3), "min": round(float(np.min(v)), 3),
                           "max": round(float(np.max(v)), 3), "n": len(v)} for o, v in ratios.items()}


def resampled_disk_area(radii=(1.5, 2.5, 3.5, 5.0), n: int = 50) -> dict:
    """The same resampling (one 40x40 slice of 1.25 mm to 44x44) of discs of the given radii (voxels) centred
    uniformly at random in the slice's middle: the area kept, mean over n discs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    out = {}
    for r in radii:
        kept = {0: [], 1: []}
        for _ in range(n):
            cy, cx = rng.uniform(15, 25, 2)
            disc = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).astype(np.float32)[None, None]
            for order in (0, 1):
                up = resample_data_or_seg_to_shape(disc, (1, 44, 44), np.array([2, 1.25, 1.25]),
                                                   np.array([2, 50 / 44, 50 / 44]), is_seg=True, order=order,
                                                   order_z=0, force_separate_z=None)
                kept[order].append(float(up.sum() * (40 / 44) ** 2 / disc.sum()))
        out[f"radius_{r}"] = {f"order_{o}": round(float(np.mean(v)), 3) for o, v in kept.items()}
    return out


def main():
    out = {"what": __doc__.split("\n\n")[0].replace("\n", " "),
           "command": "python docs/results/union_geometry/volumes.py",
           "predicted_over_reference_volume": predicted_volumes(),
           "label_area_after_resampling_to_union_grid": resampled_label_area(),
           "disc_area_after_resampling_to_union_grid": resampled_disk_area()}
    json.dump(out, open(f"{HERE}/results_volumes.json", "w"), indent=1)
    print(json.dumps({k: {kk: vv.get("mean", vv) for kk, vv in v.items()} if isinstance(v, dict) else v
                      for k, v in out.items() if k != "what"}, indent=1))


if __name__ == "__main__":
    main()
