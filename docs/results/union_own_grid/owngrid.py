"""Each task at its own spacing in a union, as an experiment outside the package (../union_own_grid/summarize.py).

prep SRC DST: a copy DST of the preprocessed union SRC (raw folder, plans, split) whose labeled cases are
preprocessed again, each at its task's own planned 2d spacing (SPACING: the 2d spacings of the per-task datasets'
plans of the `paper` preset), by nnU-Net's DefaultPreprocessor with the union's plans otherwise; no unlabeled image
(labeled-only VerSemi reads none). Then train DST with `nnUNetv2_versemi_benchmark -d DST ... --methods
VerSemiTrainer_noUnsup -o OUT` (its own predictions are made at the union's spacing).
unlabeled DST: the unlabeled images of DST, each at its task's spacing (for the models that read them).
predict DST OUT [TRAINER]: the trained model (default VerSemiTrainer_noUnsup) predicts each task's test images under the task's prompt at that task's spacing
(nnU-Net's predictor with the configuration's spacing replaced) into OUT.
copy SRC DST: the preprocessed dataset SRC (union's grid or own grids, unlabeled images included) under another id and
name, its benchmark plans left out: a second training of one setting on the same cases.
OWNGRID_SETTING picks the spacings (SETTINGS): "own" (default) or "lung" (Lung alone at its own spacing).

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...
    python owngrid.py prep Dataset980_PaperGeoL20S0 Dataset979_PaperOwnGridS0
    nnUNetv2_versemi_benchmark -d 979 -c 2d_cpu --plans-preset cpu_demo --epochs 20 --iterations 50 \\
        --val-iterations 4 --folds all -device cpu --npp 1 --disable_tta --skip-val --budget-per task \\
        -o outOwn_s0 --methods VerSemiTrainer_noUnsup
    python owngrid.py predict Dataset979_PaperOwnGridS0 outOwn_s0/pred_own_grid
"""
import copy
import glob
import json
import os
import shutil
import sys
from os.path import join

SETTINGS = {
    # every task at the 2d spacing of its own per-task plans: no task is resampled
    "own": {"Pancreas": [1.0, 1.0], "LA": [1.0, 1.0], "Spleen": [1.5, 1.5], "Lung": [1.25, 1.25]},
    # Lung alone at its own spacing, the other tasks in the union's grid (1.125 mm)
    "lung": {"Pancreas": [1.125, 1.125], "LA": [1.125, 1.125], "Spleen": [1.125, 1.125], "Lung": [1.25, 1.25]},
}
SPACING = SETTINGS[os.environ.get("OWNGRID_SETTING", "own")]
RAW, PRE = os.environ["nnUNet_raw"], os.environ["nnUNet_preprocessed"]


def task_cm(plans_manager, configuration, task):
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    cfg = copy.deepcopy(plans_manager.get_configuration(configuration).configuration)
    cfg["spacing"] = SPACING[task]
    return ConfigurationManager(cfg)


def unlabeled(dst):
    """The unlabeled images of DST's task table, each preprocessed at its task's spacing into the 2d
    configuration's unlabeled folder (the package's unlabeled preprocessing with the spacing replaced)."""
    from nnunetv2_versemi.data.preprocess import (
        _preprocess_unlabeled_case,
        _unlabeled_files,
        unlabeled_folder,
    )
    from nnunetv2_versemi.tasktable import find_task_table
    plans = json.load(open(join(PRE, dst, "nnUNetPlans.json")))
    dj = json.load(open(join(PRE, dst, "dataset.json")))
    table = find_task_table(dst)
    files = _unlabeled_files(dst, join(RAW, dst), table, dj["file_ending"], len(dj["channel_names"]))
    folder = unlabeled_folder(join(PRE, dst), plans["configurations"]["2d"]["data_identifier"])
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for task in table.tasks:
        task_plans = copy.deepcopy(plans)
        task_plans["configurations"]["2d"]["spacing"] = SPACING[task.name]
        for case in task.unlabeled:
            _preprocess_unlabeled_case((case, files[case], join(folder, case), task_plans, "2d", dj))
        print(task.name, SPACING[task.name], len(task.unlabeled), flush=True)
    print("done")


def prep(src, dst):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    shutil.copytree(join(RAW, src), join(RAW, dst))
    os.makedirs(join(PRE, dst))
    for f in ("dataset.json", "dataset_fingerprint.json", "splits_final.json", "nnUNetPlans.json"):
        shutil.copy(join(PRE, src, f), join(PRE, dst, f))
    shutil.copytree(join(PRE, src, "gt_segmentations"), join(PRE, dst, "gt_segmentations"))
    plans = json.load(open(join(PRE, dst, "nnUNetPlans.json")))
    plans["dataset_name"] = dst
    json.dump(plans, open(join(PRE, dst, "nnUNetPlans.json"), "w"), indent=1)
    pm = PlansManager(plans)
    dj = json.load(open(join(RAW, dst, "dataset.json")))
    pp = DefaultPreprocessor(verbose=False)
    out = join(PRE, dst, "nnUNetPlans_2d")
    os.makedirs(out)
    os.makedirs(out + "_unlabeled")
    for img in sorted(glob.glob(join(RAW, dst, "imagesTr", "*_0000.nii.gz"))):
        case = os.path.basename(img)[:-12]
        cm = task_cm(pm, "2d", case.split("_case")[0])
        pp.run_case_save(join(out, case), [img], join(RAW, dst, "labelsTr", case + ".nii.gz"), pm, cm, dj)
        print(case, cm.spacing, flush=True)
    print("done")


def copy_dataset(src, dst):
    shutil.copytree(join(RAW, src), join(RAW, dst))
    shutil.copytree(join(PRE, src), join(PRE, dst), ignore=shutil.ignore_patterns("*_vsbench*"))
    plans = json.load(open(join(PRE, dst, "nnUNetPlans.json")))
    plans["dataset_name"] = dst
    json.dump(plans, open(join(PRE, dst, "nnUNetPlans.json"), "w"), indent=1)
    print("done")


def predict(dst, out, trainer="VerSemiTrainer_noUnsup", plans="nnUNetPlans_vsbench-cpudemo-e20-i200-v4"):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_versemi.discovery import ensure_ext_trainer_env
    from nnunetv2_versemi.inference.predict import prompted
    from nnunetv2_versemi.tasktable import TaskTable
    ensure_ext_trainer_env()  # nnU-Net's predictor finds the trainer class by name
    res = os.environ["nnUNet_results"]
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=torch.device("cpu"),
                           verbose=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(join(res, dst, f"{trainer}__{plans}__2d_cpu"), ("all",),
                                              "checkpoint_final.pth")
    table = TaskTable.from_plans(pred.plans_manager.plans)
    os.makedirs(out, exist_ok=True)
    union_cm = pred.configuration_manager
    for t, task in enumerate(table.tasks):
        imgs = sorted(glob.glob(join(RAW, dst, "imagesTs", f"{task.name}_case_*_0000.nii.gz")))
        cm = task_cm(pred.plans_manager, "2d_cpu", task.name)
        pred.configuration_manager = cm
        with prompted(pred, t):
            pred.predict_from_files_sequential([[i] for i in imgs],
                                               [join(out, os.path.basename(i)[:-12]) for i in imgs], False, True)
        pred.configuration_manager = union_cm
        print(task.name, cm.spacing, len(imgs), flush=True)


if __name__ == "__main__":
    {"prep": prep, "copy": copy_dataset, "unlabeled": unlabeled, "predict": predict}[sys.argv[1]](*sys.argv[2:])
