"""Per-task nnU-Net trained at the union's 2d geometry: does the union's single spacing and patch explain what a
union model loses on a task against per-task nnU-Net at the task's own geometry?

For one task of a union: its benchmark per-task dataset (written by ``nnUNetv2_versemi_benchmark ... --methods a``)
gets a plans file whose 2d configuration takes the union's spacing, patch size and median image size (everything
else, the network included, stays the per-task plan's, with the benchmark preset's batch size); nnU-Net
preprocesses and trains it with the benchmark's budget (fold all), predicts the task's test cases of the union and
scores them as the benchmark scores (``evaluate_folders`` on the union's labels, the task's classes).

Usage (nnUNet_raw / nnUNet_preprocessed / nnUNet_results set as for the benchmark):
    python per_task_at_union_geometry.py UNION PER_TASK_DATASET TASK OUT_JSON [--epochs 20 --iterations 50]
"""
import argparse
import copy
import json
import os
import shutil
import subprocess
import tempfile
from os.path import join

import numpy as np
import SimpleITK as sitk
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("union")
    p.add_argument("per_task")
    p.add_argument("task")
    p.add_argument("out_json")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--val-iterations", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4, help="the cpu_demo preset's batch size")
    a = p.parse_args()

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_versemi.benchmark.report import _case_mean
    from nnunetv2_versemi.evaluation.evaluate import evaluate_folders
    from nnunetv2_versemi.tasktable import TaskTable

    pp, raw = os.environ["nnUNet_preprocessed"], os.environ["nnUNet_raw"]
    plans = json.load(open(join(pp, a.per_task, "nnUNetPlans.json")))
    union_cfg = json.load(open(join(pp, a.union, "nnUNetPlans.json")))["configurations"]["2d"]
    cfg = copy.deepcopy(plans["configurations"]["2d"])
    own = {k: cfg[k] for k in ("spacing", "patch_size", "median_image_size_in_voxels")}
    cfg.update({k: union_cfg[k] for k in own}, batch_size=a.batch_size, data_identifier="nnUNetPlans_2d_unionsp")
    name = "nnUNetPlans_unionsp"
    plans["configurations"] = {"2d": plans["configurations"]["2d"], "2d_unionsp": cfg}
    plans["plans_name"] = name
    with open(join(pp, a.per_task, name + ".json"), "w") as f:
        json.dump(plans, f, indent=1)
    dataset_id = a.per_task[7:10]
    subprocess.run(["nnUNetv2_preprocess", "-d", dataset_id, "-plans_name", name, "-c", "2d_unionsp", "-np", "1"],
                   check=True)
    tr = get_trainer_from_args(dataset_id, "2d_unionsp", "all", "nnUNetTrainer", name, device=torch.device("cpu"))
    tr.num_epochs, tr.num_iterations_per_epoch = a.epochs, a.iterations
    tr.num_val_iterations_per_epoch = a.val_iterations
    tr.run_training()

    table = TaskTable.from_dataset_json(json.load(open(join(raw, a.union, "dataset.json"))))
    task = table.tasks[table.index(a.task)]
    cases = sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(join(raw, a.union, "imagesTs"))
                   if f.startswith(a.task + "_") and f.endswith("_0000.nii.gz"))
    work = tempfile.mkdtemp(prefix="unionsp_")
    try:
        pred, ref = join(work, "pred"), join(work, "ref")
        os.makedirs(ref)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(tr.output_folder_base, use_folds=("all",),
                                                       checkpoint_name="checkpoint_final.pth")
        predictor.predict_from_files([[join(raw, a.union, "imagesTs", c + "_0000.nii.gz")] for c in cases], pred,
                                     save_probabilities=False, overwrite=True, num_processes_preprocessing=1,
                                     num_processes_segmentation_export=1)
        lut = np.asarray([0, *task.merged_values], dtype=np.uint8)  # per-task classes 1..K -> union values
        for c in cases:
            img = sitk.ReadImage(join(pred, c + ".nii.gz"))
            merged = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(img)])
            merged.CopyInformation(img)
            sitk.WriteImage(merged, join(pred, c + ".nii.gz"), True)
            shutil.copy(join(raw, a.union, "labelsTs", c + ".nii.gz"), join(ref, c + ".nii.gz"))
        res = evaluate_folders(ref, pred, table, task=None, num_processes=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dice = {c: _case_mean(r["metrics"], "dice") for c, r in res["cases"].items()}  # the benchmark's case Dice
    out = {"union": a.union, "per_task_dataset": a.per_task, "task": a.task, "own_geometry": own,
           "union_geometry": {k: union_cfg[k] for k in own},
           "budget": {"epochs": a.epochs, "iterations": a.iterations, "batch_size": a.batch_size},
           "dice_per_case": dice, "mean_dice": float(np.mean(list(dice.values()))),
           "command": "python docs/results/union_geometry/per_task_at_union_geometry.py "
                      f"{a.union} {a.per_task} {a.task} {a.out_json}"}
    with open(a.out_json, "w") as f:
        json.dump(out, f, indent=1)
    print("RESULT", a.task, "union geometry", round(out["mean_dice"], 4))


if __name__ == "__main__":
    main()
