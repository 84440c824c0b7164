"""``nnUNetv2_versemi_predict``: task-prompted prediction with a trained VerSemi model.

``--task NAME``: raw images of that task, as they were in its source dataset (any format nnU-Net reads);
the task's intensity transform is applied, only that task's prompt runs, and label maps are written in the
source dataset's own label values and in the input's geometry.
``--task all``: union-format images (as in the union's imagesTs); merged label maps, as stock
``nnUNetv2_predict`` writes them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from os.path import isdir, isfile, join

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from tqdm import tqdm

from nnunetv2_versemi.discovery import ensure_ext_trainer_env
from nnunetv2_versemi.tasktable import Task, TaskTable, TaskTableError

ALL = "all"


class PredictionError(ValueError):
    """Bad input to the predictor (unknown task, wrong channels, unusable model folder)."""


def resolve_model_folder(dataset: str, configuration: str, trainer: str, plans: str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise PredictionError(str(e)) from e
    return get_output_folder(name, trainer, plans, configuration)


def load_model_table(model_folder: str) -> TaskTable:
    plans_file = join(model_folder, "plans.json")
    if not isfile(plans_file):
        raise PredictionError(f"{model_folder} is not a trained model folder (no plans.json)")
    try:
        return TaskTable.from_plans(load_json(plans_file), where=plans_file)
    except TaskTableError as e:
        raise PredictionError(f"{e} (model folder {model_folder}: not a VerSemi model?)") from e


def check_folds(model_folder: str, folds: list[str], checkpoint: str) -> None:
    missing = [f for f in folds if not isfile(join(model_folder, f"fold_{f}", checkpoint))]
    if missing:
        raise PredictionError(
            f"Missing {checkpoint} for fold(s) {', '.join(missing)} in {model_folder}"
        )


def list_cases(input_folder: str, file_ending: str | None, num_channels: int) -> dict[str, list[str]]:
    """CASE -> [CASE_0000.ext, ...] for every case in the folder; checks the channel count."""
    if not isdir(input_folder):
        raise PredictionError(f"Input folder {input_folder} does not exist")
    files = sorted(f for f in os.listdir(input_folder) if file_ending is None or f.endswith(file_ending))
    if file_ending is None and files:
        # use the first ending found: CASE_XXXX<ending>
        file_ending = files[0][files[0].rfind("_") + 5:]
        files = [f for f in files if f.endswith(file_ending)]
    cases: dict[str, list[str]] = {}
    for f in files:
        stem = f[: -len(file_ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            continue
        cases.setdefault(stem[:-5], []).append(join(input_folder, f))
    if not cases:
        raise PredictionError(f"No images named CASE_XXXX{file_ending or ''} in {input_folder}")
    for case, fs in cases.items():
        if len(fs) != num_channels:
            raise PredictionError(
                f"Case {case} has {len(fs)} channel file(s) in {input_folder}, the task expects {num_channels}"
            )
    return cases


def make_predictor(model_folder: str, folds: list[str], checkpoint: str, step_size: float, tta: bool,
                   device: torch.device):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    ensure_ext_trainer_env()
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=tta,
                                perform_everything_on_device=device.type != "cpu", device=device, verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        model_folder, [f if f == "all" else int(f) for f in folds], checkpoint)
    from nnunetv2_versemi.network.head import VerSemiNetwork

    net = getattr(predictor.network, "_orig_mod", predictor.network)
    if not isinstance(net, VerSemiNetwork):
        raise PredictionError(f"The model in {model_folder} was not trained with a VerSemi trainer")
    return predictor, net


def predict_task(predictor, net, task_index: int, task: Task, cases: dict[str, list[str]], output_folder: str,
                 num_processes_preprocessing: int, chunk: int = 8) -> list[str]:
    """Predict raw source images of one task; write source-valued label maps. Returns written files."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    from nnunetv2_versemi.data.normalization import prepare_raw_task_image

    first = next(iter(cases.values()))[0]
    rw = determine_reader_writer_from_file_ending(task.file_ending, first, allow_nonmatching_filename=True,
                                                  verbose=False)()
    lut = np.zeros(max(task.merged_values) + 1, dtype=np.uint16)
    for lab in task.labels:
        lut[lab.merged] = lab.source
    out_dtype = np.uint8 if max(task.source_values) < 256 else np.uint16
    net.prompt = task_index
    written = []
    names = sorted(cases)
    try:
        with tqdm(total=len(names), desc=f"Predicting task {task.name}") as bar:
            for start in range(0, len(names), chunk):
                batch = names[start:start + chunk]
                images, props = [], []
                for case in batch:
                    try:
                        img, p = rw.read_images(cases[case])
                    except Exception as e:  # reader errors vary by format
                        raise PredictionError(f"Cannot read case {case} ({cases[case]}): {e}") from e
                    images.append(prepare_raw_task_image(img, task))
                    props.append(p)
                segs = predictor.predict_from_list_of_npy_arrays(
                    images, None, props, None, num_processes=num_processes_preprocessing,
                    num_processes_segmentation_export=max(1, num_processes_preprocessing))
                for case, seg, p in zip(batch, segs, props):
                    out_file = join(output_folder, case + task.file_ending)
                    rw.write_seg(lut[np.asarray(seg)].astype(out_dtype), out_file, p)
                    written.append(out_file)
                    bar.update()
    finally:
        net.prompt = None
    return written


def run(input_folder: str, output_folder: str, dataset: str, configuration: str, folds: list[str], task: str,
        trainer: str = "VerSemiTrainer", plans: str = "nnUNetPlans", checkpoint: str = "checkpoint_final.pth",
        step_size: float = 0.5, tta: bool = True, npp: int = 3, nps: int = 3, device: str = "cuda",
        model_folder: str | None = None) -> list[str]:
    model_folder = model_folder or resolve_model_folder(dataset, configuration, trainer, plans)
    if not isdir(model_folder):
        raise PredictionError(f"Model folder {model_folder} does not exist (trainer {trainer}, plans {plans}, "
                              f"configuration {configuration})")
    table = load_model_table(model_folder)
    if task != ALL and task not in table.names:
        raise PredictionError(f"Unknown task '{task}'. Valid tasks: {', '.join(table.names)} (or '{ALL}')")
    check_folds(model_folder, folds, checkpoint)
    dataset_json = load_json(join(model_folder, "dataset.json"))
    if task == ALL:
        n_channels = len(dataset_json["channel_names"])
        cases = list_cases(input_folder, dataset_json["file_ending"], n_channels)
    else:
        t = table.tasks[table.index(task)]
        n_channels = 1 if t.channel is not None else len(t.channel_names)
        cases = list_cases(input_folder, t.file_ending, n_channels)
    dev = torch.device(device)
    predictor, net = make_predictor(model_folder, folds, checkpoint, step_size, tta, dev)

    # write into a temporary folder beside the target: a failed run leaves no half-written output
    parent = os.path.dirname(os.path.abspath(output_folder)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".versemi_predict_", dir=parent)
    try:
        if task == ALL:
            net.prompt = None
            predictor.predict_from_files([cases[c] for c in sorted(cases)], tmp, save_probabilities=False,
                                         overwrite=True, num_processes_preprocessing=npp,
                                         num_processes_segmentation_export=nps)
        else:
            predict_task(predictor, net, table.index(task), table.tasks[table.index(task)], cases, tmp, npp)
        os.makedirs(output_folder, exist_ok=True)
        written = []
        for f in sorted(os.listdir(tmp)):
            shutil.move(join(tmp, f), join(output_folder, f))
            written.append(join(output_folder, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", required=True, help="input folder (CASE_0000.ext files)")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("-d", required=True, help="union dataset id or name")
    parser.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("-f", nargs="+", default=["0"], help="folds to ensemble (default 0)")
    parser.add_argument("--task", required=True, help="task name (source-format images) or 'all' (union images)")
    parser.add_argument("-tr", default="VerSemiTrainer", help="trainer class (default VerSemiTrainer)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding window step size (default 0.5)")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    parser.add_argument("-npp", type=int, default=3, help="preprocessing processes")
    parser.add_argument("-nps", type=int, default=3, help="segmentation export processes")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device")
    args = parser.parse_args(argv)
    try:
        written = run(args.i, args.o, args.d, args.c, args.f, args.task, args.tr, args.p, args.chk,
                      args.step_size, not args.disable_tta, args.npp, args.nps, args.device)
    except (PredictionError, TaskTableError) as e:
        parser.exit(2, f"nnUNetv2_versemi_predict: error: {e}\n")
    print(f"Wrote {len(written)} prediction(s) to {args.o}")
