"""How good are the unlabeled-image targets? For a trained union model (fold all), on every unlabeled image of
the union whose source dataset has its label: Dice (threshold 0.5, per case, over the case's 2d slices) of the
image's own task head, of the paper's P_agg (any task head says foreground), of the synthetic head, and the
share of voxels each task head calls foreground.

Usage: python unlabeled_targets.py CONFIGURATION OUTPUT.json MODEL_FOLDER [MODEL_FOLDER ...]
(environment: nnUNet_raw with the union and its source datasets)."""
import json
import os
import sys

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_versemi.tasktable import TaskTable
from nnunetv2_versemi.training import losses
from nnunetv2_versemi.training.trainer import VerSemiTrainer

torch.set_num_threads(1)
raw = os.environ["nnUNet_raw"]


def dice(p, t):
    s = p.sum() + t.sum()
    return 2 * (p & t).sum() / s if s > 0 else 1.0


out = {}
for model in sys.argv[3:]:
    pm = PlansManager(load_json(f"{model}/plans.json"))
    cm = pm.get_configuration(sys.argv[1])
    dj = load_json(f"{model}/dataset.json")
    table = TaskTable.from_plans(pm.plans)
    net = VerSemiTrainer.build_network_architecture(pm, cm, 1, table.num_merged_labels, False)
    sd = torch.load(f"{model}/fold_all/checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    print(net.load_state_dict(sd, strict=False))
    net.eval()
    T = table.num_tasks
    ncls = table.num_classes_per_prompt()
    pre = DefaultPreprocessor(verbose=False)
    union = os.path.basename(os.path.dirname(model))
    res = {}
    for ti, task in enumerate(table.tasks):
        src, name, unl = task.source_dataset, task.name, task.unlabeled
        rows = []
        for case in unl:
            lab = f"{raw}/{src}/labelsTr/{case[len(name)+1:]}.nii.gz"
            if not os.path.isfile(lab):
                continue
            img = f"{raw}/{union}/imagesUnlabeled/{case}_0000.nii.gz"
            data, seg, _ = pre.run_case([img], lab, pm, cm, dj)
            gt = seg[0] > 0
            probs = []
            for z in range(data.shape[1]):
                x = torch.from_numpy(data[:, z][None]).float()
                h, w = x.shape[2:]
                H, W = -(-h // 8) * 8, -(-w // 8) * 8
                x = torch.nn.functional.pad(x, (0, W - w, 0, H - h))
                with torch.no_grad():
                    o = net(x, torch.arange(T + 1)[None])
                o = o[0] if isinstance(o, (list, tuple)) else o
                fg = torch.stack([losses.foreground_probability(o[:, p], ncls[p]) for p in range(T + 1)], 1)[0, :, :h, :w]
                probs.append(fg.numpy())
            P = np.stack(probs, 1) > 0.5  # (T+1, Z, Y, X)
            rows.append({"own": dice(P[ti], gt), "agg": dice(P[:T].any(0), gt), "syn": dice(P[T], gt),
                         "foreign_fg": [float(P[t].mean()) for t in range(T)], "gt_frac": float(gt.mean())})
        res[name] = {k: float(np.mean([r[k] for r in rows])) for k in ("own", "agg", "syn", "gt_frac")}
        res[name]["foreign_fg"] = np.mean([r["foreign_fg"] for r in rows], 0).round(4).tolist()
        res[name]["n"] = len(rows)
        print(os.path.basename(model), name, res[name], flush=True)
    out[os.path.relpath(model, os.environ["nnUNet_results"])] = res
json.dump(out, open(sys.argv[2], "w"), indent=1)
