"""Is Lung's under-segmentation a threshold the union model sets too high? Lung's test images of the `paper` preset's
three draws (the repeat unions 970, 969, 968), predicted with their probabilities by the default's union model
(`VerSemiTrainer_supFinish40`, under Lung's prompt) and by per-task nnU-Net's Lung model, then segmented at several
thresholds on the tumour's probability. Dice and predicted / reference volume, mean over the 10 test cases; recall
and precision over all their voxels.

Usage (nnUNet_raw / nnUNet_preprocessed / nnUNet_results set as for the runs, the models of the benchmark's second
runs trained; see docs/BENCHMARKS.md, "Lung's recall"):
    python docs/results/lung_recall/threshold_sweep.py
Writes threshold_sweep.json here.
"""
import glob
import json
import os

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunetv2_versemi.inference.predict import load_model_table, make_predictor, prompted

HERE = os.path.dirname(os.path.abspath(__file__))
DRAWS = [("Dataset970_PaperGeoRS0", "Dataset002_VSBench970_Lung"), ("Dataset969_PaperGeoRS1", "Dataset006_VSBench969_Lung"),
         ("Dataset968_PaperGeoRS2", "Dataset010_VSBench968_Lung")]
THRESHOLDS = [0.5, 0.4, 0.3, 0.2, 0.1]


def tumour_probabilities(predictor, images, props) -> list[np.ndarray]:
    results = predictor.predict_from_list_of_npy_arrays(images, None, props, None, 1, True, 1)
    return [probs[1:].sum(0) for _, probs in results]


def main() -> None:
    torch.set_num_threads(1)
    raw, res = os.environ["nnUNet_raw"], os.environ["nnUNet_results"]
    out = {"what": __doc__.split("\n\n")[0], "command": "python docs/results/lung_recall/threshold_sweep.py",
           "machine": "2 CPU cores, no GPU", "thresholds": THRESHOLDS, "draws": {}}
    for union, alone in DRAWS:
        files = sorted(glob.glob(os.path.join(raw, union, "imagesTs", "Lung_case_*_0000.nii.gz")))
        refs = [sitk.GetArrayFromImage(sitk.ReadImage(f.replace("imagesTs", "labelsTs").replace("_0000", ""))) > 0
                for f in files]
        rw = SimpleITKIO()
        images, props = zip(*(rw.read_images([f]) for f in files))
        folder = glob.glob(os.path.join(res, union, "VerSemiTrainer_supFinish40__*"))[0]
        predictor, net = make_predictor(folder, ["all"], "checkpoint_final.pth", 0.5, False, torch.device("cpu"))
        table = load_model_table(folder)
        lung = [t.name for t in table.tasks].index("Lung")
        with prompted(net, lung):
            union_probs = tumour_probabilities(predictor, list(images), list(props))
        alone_predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, perform_everything_on_device=False,
                                          device=torch.device("cpu"), allow_tqdm=False)
        alone_predictor.initialize_from_trained_model_folder(
            glob.glob(os.path.join(res, alone, "nnUNetTrainer__*"))[0], ["all"], "checkpoint_final.pth")
        alone_probs = tumour_probabilities(alone_predictor, list(images), list(props))
        out["draws"][union] = {}
        for name, probs in (("(d) the default", union_probs), ("(a) per-task nnU-Net", alone_probs)):
            dice = {t: float(np.mean([2 * ((p >= t) & g).sum() / ((p >= t).sum() + g.sum()) for p, g in zip(probs, refs)]))
                    for t in THRESHOLDS}
            volume = {t: float(np.mean([(p >= t).sum() / g.sum() for p, g in zip(probs, refs)])) for t in THRESHOLDS}
            # over all test voxels of the draw: where the missing Dice is (false negatives or false positives)
            tp = {t: int(sum(((p >= t) & g).sum() for p, g in zip(probs, refs))) for t in THRESHOLDS}
            fp = {t: int(sum(((p >= t) & ~g).sum() for p, g in zip(probs, refs))) for t in THRESHOLDS}
            ref = int(sum(g.sum() for g in refs))
            out["draws"][union][name] = {"dice": dice, "volume_ratio": volume, "reference_voxels": ref,
                                         "recall": {t: tp[t] / ref for t in THRESHOLDS},
                                         "precision": {t: tp[t] / max(1, tp[t] + fp[t]) for t in THRESHOLDS}}
            print(union, name, {t: round(100 * v, 1) for t, v in dice.items()},
                  "volume", {t: round(v, 2) for t, v in volume.items()},
                  f"recall {tp[0.5] / ref:.2f} precision {tp[0.5] / max(1, tp[0.5] + fp[0.5]):.2f}", flush=True)
    with open(os.path.join(HERE, "threshold_sweep.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
