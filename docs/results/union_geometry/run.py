"""Per-task nnU-Net on Spleen (seed-0 per-task dataset) with the union's 2d spacing/patch: does the union's
resampling explain the union models' loss on Spleen?"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import SimpleITK as sitk
import torch


def main():
    pp = os.environ["nnUNet_preprocessed"]
    ds = sys.argv[1]          # e.g. Dataset993_VSBench990_Spleen
    task = sys.argv[2]        # Spleen
    mode = sys.argv[3]        # "union" or "own"
    union_name = sys.argv[4] if len(sys.argv) > 4 else "Dataset990_PaperDemoL20"  # the union the task came from
    plans = json.load(open(f"{pp}/{ds}/nnUNetPlans.json"))
    union = json.load(open(f"{pp}/{union_name}/nnUNetPlans.json"))["configurations"]["2d"]
    cfg = copy.deepcopy(plans["configurations"]["2d"])
    if mode == "union":
        cfg.update(spacing=union["spacing"], patch_size=union["patch_size"], median_image_size_in_voxels=union["median_image_size_in_voxels"])
    cfg["batch_size"] = 4
    cfg["data_identifier"] = f"nnUNetPlans_2d_{mode}sp"
    plans["configurations"] = {"2d": plans["configurations"]["2d"], f"2d_{mode}sp": cfg}
    name = f"nnUNetPlans_{mode}sp"
    plans["plans_name"] = name
    json.dump(plans, open(f"{pp}/{ds}/{name}.json", "w"), indent=1)
    subprocess.run(["nnUNetv2_preprocess", "-d", ds[7:10], "-plans_name", name, "-c", f"2d_{mode}sp", "-np", "1"], check=True)
    from nnunetv2.run.run_training import get_trainer_from_args
    tr = get_trainer_from_args(ds[7:10], f"2d_{mode}sp", "all", "nnUNetTrainer", name, device=torch.device("cpu"))
    tr.num_epochs, tr.num_iterations_per_epoch, tr.num_val_iterations_per_epoch = 20, 50, 4
    tr.run_training()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(tr.output_folder_base, use_folds=("all",), checkpoint_name="checkpoint_final.pth")
    raw = os.environ["nnUNet_raw"] + "/" + union_name
    dj = json.load(open(raw + "/dataset.json"))
    t = [x for x in dj["versemi"]["tasks"] if x["name"] == task][0]
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"pred_{ds}_{mode}")
    cases = sorted(f for f in os.listdir(raw + "/imagesTs") if f.startswith(task))
    p.predict_from_files([[raw + "/imagesTs/" + f] for f in cases], out, save_probabilities=False, overwrite=True,
                         num_processes_preprocessing=1, num_processes_segmentation_export=1)
    res = {}
    for f in cases:
        c = f.replace("_0000.nii.gz", "")
        pr = sitk.GetArrayFromImage(sitk.ReadImage(f"{out}/{c}.nii.gz")) > 0
        gt = sitk.GetArrayFromImage(sitk.ReadImage(f"{raw}/labelsTs/{c}.nii.gz"))
        gt = np.isin(gt, t["merged_values"] if "merged_values" in t else [lab["merged"] for lab in t["labels"]])
        res[c] = 2 * (pr & gt).sum() / (pr.sum() + gt.sum())
    with open(os.path.join(os.path.dirname(out), f"result_{ds}_{mode}.json"), "w") as f:
        json.dump({"dataset": ds, "union": union_name, "task": task, "mode": mode,
                   "dice_per_case": {k: round(float(v), 4) for k, v in res.items()}}, f, indent=1)
    print("RESULT", task, mode, {k: round(float(v), 4) for k, v in res.items()}, "mean", round(float(np.mean(list(res.values()))), 4))


if __name__ == "__main__":
    main()
