"""``nnUNetv2_versemi_predict``: task-prompted prediction with a trained VerSemi model.

``--task NAME``: raw images of that task, as they were in its source dataset (any format nnU-Net reads);
the task's intensity transform is applied, only that task's prompt runs, and label maps are written in the
source dataset's own label values and in the input's geometry.
``--task auto`` (default): raw source images of any of the model's tasks, mixed in one folder; each case's task
is recognised by the network's task classifier (each candidate task's intensity transform a hypothesis,
:func:`recognise_case`), then the case is predicted as with ``--task`` of that task. The recognised task
per case goes to ``recognised_tasks.json`` in the output folder.
``--task all``: union-format images (as in the union's imagesTs); merged label maps, as stock
``nnUNetv2_predict`` writes them (the prompt-free network: each patch routed to the task it is recognised as).
"""

from __future__ import annotations

import os
import shutil
from os.path import isdir, isfile, join

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from tqdm import tqdm

from nnunetv2_versemi.discovery import ensure_ext_trainer_env
from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.imageio import (
    geometry_difference,
    geometry_of,
    image_dimension,
    intensity_problem,
    read_checked,
)
from nnunetv2_versemi.inference.prompted import plain_network, prompted
from nnunetv2_versemi.inputs import output_folder_problem, read_json_object
from nnunetv2_versemi.nnunet_paths import dataset_name
from nnunetv2_versemi.tasktable import Task, TaskTable, TaskTableError, find_task_table
from nnunetv2_versemi.writers import make_temporary_beside, writer_lock

ALL = "all"
AUTO = "auto"
RECOGNISED_JSON = "recognised_tasks.json"


class PredictionError(VerSemiInputError):
    """Bad input to the predictor (unknown task, wrong channels, unusable model folder)."""


def resolve_model_folder(dataset: str, configuration: str, trainer: str, plans: str) -> str:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return get_output_folder(dataset_name(dataset), trainer, plans, configuration)


def load_model_table(model_folder: str) -> TaskTable:
    plans_file = join(model_folder, "plans.json")
    if not isfile(plans_file):
        raise PredictionError(f"{model_folder} is not a trained model folder (no plans.json)")
    try:
        return find_task_table(path=plans_file)
    except TaskTableError as e:
        raise PredictionError(f"{e} (model folder {model_folder}: not a VerSemi model?)") from e


def check_folds(model_folder: str, folds: list[str], checkpoint: str) -> None:
    missing = [f for f in folds if not isfile(join(model_folder, f"fold_{f}", checkpoint))]
    if missing:
        raise PredictionError(
            f"Missing {checkpoint} for fold(s) {', '.join(missing)} in {model_folder}"
        )


def list_cases(input_folder: str, file_ending: str | None, num_channels: int | None) -> dict[str, list[str]]:
    """CASE -> [CASE_0000.ext, ...] for every case in the folder; checks the channel count (None: any)."""
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
        if num_channels is not None and len(fs) != num_channels:
            raise PredictionError(
                f"Case {case} has {len(fs)} channel file(s) in {input_folder}, the task expects {num_channels}"
            )
        indices = [int(f[len(join(input_folder, case)) + 1:][:4]) for f in fs]
        if indices != list(range(len(fs))):
            raise PredictionError(
                f"Case {case} in {input_folder} has channel files {[f'_{i:04d}' for i in indices]}; channel files "
                f"are numbered from _0000 without gaps")
        for f in fs:
            check_image_header(case, f)
    return cases


def check_image_header(case: str, path: str) -> None:
    """A case file must hold one scalar 2d or 3d image (one channel per file, as nnU-Net expects). Read from the
    header where SimpleITK reads the format; other formats are left to nnU-Net's reader."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return
    if reader.GetNumberOfComponents() != 1 or reader.GetDimension() not in (2, 3):
        raise PredictionError(
            f"Case {case}: {path} is a {reader.GetDimension()}-d image with {reader.GetNumberOfComponents()} "
            "component(s) per voxel; each file must hold one scalar 2d or 3d image (one file per channel: "
            "CASE_0000, CASE_0001, ...)")


def model_image_dimension(model_folder: str) -> int | None:
    """2 or 3: the dimensionality of the images the model was planned on (nnU-Net plans 2d images as one slice
    of spacing 999); None when the plans do not say."""
    try:
        spacing = read_json_object(join(model_folder, "plans.json")).get("original_median_spacing_after_transp")
    except (OSError, ValueError):
        return None
    if not isinstance(spacing, list) or len(spacing) != 3:
        return None
    return 2 if float(spacing[0]) == 999 else 3


def check_case_images(cases: dict[str, list[str]], dimension: int | None) -> None:
    """Read every file of every case as the predictor will (all checks before the model loads): readable, a
    complete gzip stream, finite values float32 normalization can handle, the model's dimensionality."""
    for case in sorted(cases):
        first = None
        for f in cases[case]:
            try:
                arr, props, _ = read_checked(f, "image")
            except ValueError as e:
                raise PredictionError(f"Case {case}: cannot read {f}: {e}") from e
            if (problem := intensity_problem(arr)) is not None:
                raise PredictionError(f"Case {case}: {f} {problem}")
            if dimension is not None and image_dimension(props) != dimension:
                raise PredictionError(f"Case {case}: {f} is a {image_dimension(props)}d image; the model was "
                                      f"trained on {dimension}d images")
            if first is None:
                first = (f, arr.shape, geometry_of(props))
            elif arr.shape != first[1] or (diff := geometry_difference(first[2], geometry_of(props))) is not None:
                what = f"shape {arr.shape[1:]} vs {first[1][1:]}" if arr.shape != first[1] else diff
                raise PredictionError(f"Case {case}: channel file {f} does not match {first[0]}: {what}")


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

    net = plain_network(predictor)
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
    lut = task.merged_to_source_lut()
    out_dtype = np.uint8 if max(task.source_values) < 256 else np.uint16
    written = []
    names = sorted(cases)
    with prompted(net, task_index):
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
    return written


def task_input_channels(task: Task) -> int:
    """Channel files per case of the task's source images: all of its source dataset's channels, also for a task
    merged with one of them (``--channel``); the predictor selects that one."""
    return len(task.channel_names)


def list_auto_cases(input_folder: str, table: TaskTable) -> dict[str, tuple[list[str], list[int]]]:
    """CASE -> (its files, the tasks whose file ending and channel count it fits) for a folder that may mix
    the source images of several tasks."""
    endings = sorted({t.file_ending for t in table.tasks}, key=len, reverse=True)
    found: dict[str, tuple[list[str], list[int]]] = {}
    for ending in endings:
        if not isdir(input_folder):
            break
        if not any(f.endswith(ending) for f in os.listdir(input_folder)):
            continue
        for case, files in list_cases(input_folder, ending, None).items():
            if case in found:
                continue
            fits = [i for i, t in enumerate(table.tasks)
                    if t.file_ending == ending and task_input_channels(t) == len(files)]
            if not fits:
                raise PredictionError(
                    f"Case {case} ({len(files)} channel file(s), {ending}) fits no task of this model: "
                    + "; ".join(f"{t.name}: {task_input_channels(t)} x {t.file_ending}" for t in table.tasks))
            found[case] = (files, fits)
    if not found:
        list_cases(input_folder, endings[0] if len(endings) == 1 else None, None)  # raises the usual errors
        raise PredictionError(f"No images of the model's tasks ({', '.join(endings)}) in {input_folder}")
    return found


def calibrated_units(task: Task) -> bool:
    """Whether the task's intensity transform has fixed parameters in calibrated units (CT: a Hounsfield window
    and the task's own mean and std), as opposed to a per-image one (z-score, rescaling) that makes any image
    look standardised."""
    norm = task.normalization
    schemes = [c.get("scheme") for c in norm.get("channels", [])] if norm.get("scheme") == "per_channel" \
        else [norm.get("scheme")]
    return all(scheme == "CT" for scheme in schemes)


def recognise_case(predictor, net, image: np.ndarray, props: dict, tasks: list[int], table: TaskTable,
                   batch: int = 16) -> np.ndarray:
    """Task scores (T,) of one raw case, summing to 1; tasks that are not candidates score 0.

    Each candidate task t is a hypothesis: the image gets t's intensity transform and nnU-Net's preprocessing,
    and the task classifier's mean probabilities over the case's non-overlapping patches (T,) say which task
    that input looks like. The hypothesis is consistent when they say t; its score is their probability of t.
    Consistent hypotheses with a calibrated transform (:func:`calibrated_units`) go first: a CT image z-scored
    looks like a z-scored MR task's images to the classifier (it was consistent with 0.94 on the demo, beside
    0.96 for the right CT task), while an image that the fixed Hounsfield window of a CT task turns into
    something the classifier takes for that task is in that task's units. The scores of the hypotheses not in
    the first group that has any (consistent and calibrated; consistent; all) are 0.

    The network runs in eval mode (the caller's mode comes back afterwards): nnU-Net's predictor leaves a freshly
    loaded network in training mode, where the classifier's standardisation would take the statistics of this
    one case's patches (one task) and lose what tells the tasks apart."""
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    seen = {}
    was_training = net.training
    net.eval()
    try:
        for t in tasks:
            seen[t] = _task_probabilities(predictor, net, preprocessor, image, props, table.tasks[t], batch)
    finally:
        net.train(was_training)
    consistent = [t for t in tasks if int(seen[t].argmax()) == t]
    calibrated = [t for t in consistent if calibrated_units(table.tasks[t])]
    kept = calibrated or consistent or tasks
    scores = np.zeros(table.num_tasks)
    for t in kept:
        scores[t] = seen[t][t]
    return scores / max(scores.sum(), 1e-12)


def _task_probabilities(predictor, net, preprocessor, image: np.ndarray, props: dict, task: Task,
                        batch: int) -> np.ndarray:
    """The task classifier's mean probabilities (T,) over the non-overlapping patches of ``image`` prepared as
    ``task``'s own images are."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    from nnunetv2_versemi.data.normalization import prepare_raw_task_image

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    patch = list(cm.patch_size)
    data, _, _ = preprocessor.run_case_npy(prepare_raw_task_image(image, task), None, dict(props), pm, cm,
                                           predictor.dataset_json)
    data = torch.from_numpy(np.ascontiguousarray(data)).float()
    if len(patch) == 2:  # a 2d model sees the slices
        data = data.permute(1, 0, 2, 3)
    else:
        data = data[None]
    data, _ = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    steps = compute_steps_for_sliding_window(data.shape[2:], patch, 1.0)
    tiles = [data[(slice(None), slice(None), *[slice(s, s + p) for s, p in zip(starts, patch)])]
             for starts in np.array(np.meshgrid(*steps, indexing="ij")).reshape(len(patch), -1).T]
    tiles = torch.cat(tiles).to(predictor.device)
    with torch.no_grad():
        probs = torch.cat([net.recognise(tiles[i:i + batch]) for i in range(0, len(tiles), batch)])
    return probs.mean(0).cpu().numpy().astype(np.float64)


#: a recognised task must beat the runner-up by this much, and chance (1 / number of tasks) by half of it (the
#: same condition for two tasks: 0.6 against 0.4)
RECOGNITION_MARGIN = 0.2


def recognition_doubt(case: str, scores: np.ndarray, names: list[str], margin: float = RECOGNITION_MARGIN
                      ) -> str | None:
    """A warning when a case's task is not recognised clearly: the most likely task beats the runner-up by less
    than ``margin`` or chance (1/T) by less than ``margin / 2`` (two tasks at 0.503 and 0.497 are a coin flip);
    None when it is clear."""
    if len(scores) < 2:
        return None
    order = np.argsort(scores)[::-1]
    best, second = order[0], order[1]
    chance = 1.0 / len(scores)
    if scores[best] - scores[second] >= margin and scores[best] - chance >= margin / 2:
        return None
    return (f"case {case}: task not recognised clearly: predicted as {names[best]} ({scores[best]:.3f}), runner-up "
            f"{names[second]} ({scores[second]:.3f}), chance {chance:.3f}. Check the case, or name its task with "
            "--task NAME")


def predict_auto(predictor, net, table: TaskTable, cases: dict[str, tuple[list[str], list[int]]],
                 output_folder: str, npp: int) -> tuple[list[str], dict]:
    """``--task auto``: recognise each case's task, then predict the cases of each task under its prompt."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    if table.num_tasks > 1 and net.routing != "recognised":
        raise PredictionError("This model has no task classifier (trained before task recognition): name the "
                              "task of the images with --task NAME")
    report, groups = {}, {}
    for case in tqdm(sorted(cases), desc="Recognising tasks", disable=table.num_tasks == 1):
        files, fits = cases[case]
        if table.num_tasks == 1:
            scores = np.ones(1)
        else:
            rw = determine_reader_writer_from_file_ending(table.tasks[fits[0]].file_ending, files[0],
                                                          allow_nonmatching_filename=True, verbose=False)()
            try:
                img, props = rw.read_images(files)
            except Exception as e:  # reader errors vary by format
                raise PredictionError(f"Cannot read case {case} ({files}): {e}") from e
            scores = recognise_case(predictor, net, img, props, fits, table)
        t = int(scores.argmax())
        if (doubt := recognition_doubt(case, scores, table.names)) is not None:
            print(f"WARNING: {doubt}")
        report[case] = {"task": table.tasks[t].name, "probability": round(float(scores[t]), 4),
                        "probabilities": {task.name: round(float(p), 4) for task, p in zip(table.tasks, scores)}}
        groups.setdefault(t, {})[case] = files
    written = []
    for t, group in sorted(groups.items()):
        written += predict_task(predictor, net, t, table.tasks[t], group, output_folder, npp)
    return written, report


def validate_inputs(input_folder: str, output_folder: str, model_folder: str, folds: list[str], task: str,
                    checkpoint: str = "checkpoint_final.pth", configuration: str = "", trainer: str = "",
                    plans: str = "") -> tuple[TaskTable, dict]:
    """Every check of a prediction run, before the model loads: the output path, the model folder and its
    JSON files, the task, the folds, the input cases' files and every image in them. Returns the task table
    and the cases (as :func:`list_cases` / :func:`list_auto_cases` give them)."""
    if (problem := output_folder_problem(output_folder)) is not None:
        raise PredictionError(problem)
    if not isdir(model_folder):
        raise PredictionError(f"Model folder {model_folder} does not exist (trainer {trainer}, plans {plans}, "
                              f"configuration {configuration})")
    table = load_model_table(model_folder)
    if task not in (ALL, AUTO) and task not in table.names:
        raise PredictionError(f"Unknown task '{task}'. Valid tasks: {', '.join(table.names)} (or '{AUTO}', "
                              f"'{ALL}')")
    check_folds(model_folder, folds, checkpoint)
    try:
        dataset_json = read_json_object(join(model_folder, "dataset.json"))
    except (OSError, ValueError) as e:
        raise PredictionError(f"Model folder {model_folder}: {e}") from e
    if task == ALL:
        cases = list_cases(input_folder, dataset_json.get("file_ending"), len(dataset_json.get("channel_names", {})))
        files = cases
    elif task == AUTO:
        cases = list_auto_cases(input_folder, table)
        files = {c: fs for c, (fs, _) in cases.items()}
    else:
        t = table.tasks[table.index(task)]
        cases = files = list_cases(input_folder, t.file_ending, task_input_channels(t))
    check_case_images(files, model_image_dimension(model_folder))
    return table, cases


def run(input_folder: str, output_folder: str, dataset: str, configuration: str, folds: list[str], task: str,
        trainer: str = "VerSemiTrainer", plans: str = "nnUNetPlans", checkpoint: str = "checkpoint_final.pth",
        step_size: float = 0.5, tta: bool = True, npp: int = 3, nps: int = 3, device: str = "cuda",
        model_folder: str | None = None) -> list[str]:
    model_folder = model_folder or resolve_model_folder(dataset, configuration, trainer, plans)
    table, cases = validate_inputs(input_folder, output_folder, model_folder, folds, task, checkpoint,
                                   configuration, trainer, plans)
    target = os.path.abspath(output_folder)
    # one run writes an output folder at a time; the lock file sits beside it
    with writer_lock(os.path.dirname(target), os.path.basename(target), f"Output folder {target}"):
        predictor, net = make_predictor(model_folder, folds, checkpoint, step_size, tta, torch.device(device))
        # write into a temporary folder beside the target (those of killed runs are removed first): a failed
        # run leaves no half-written output
        tmp = make_temporary_beside(target, "predict")
        try:
            if task == ALL:
                predictor.predict_from_files([cases[c] for c in sorted(cases)], tmp, save_probabilities=False,
                                             overwrite=True, num_processes_preprocessing=npp,
                                             num_processes_segmentation_export=nps)
            elif task == AUTO:
                _, report = predict_auto(predictor, net, table, cases, tmp, npp)
                save_json(report, join(tmp, RECOGNISED_JSON), sort_keys=False)
            else:
                predict_task(predictor, net, table.index(task), table.tasks[table.index(task)], cases, tmp, npp)
            os.makedirs(target, exist_ok=True)
            written = []
            for f in sorted(os.listdir(tmp)):
                shutil.move(join(tmp, f), join(target, f))
                written.append(join(output_folder, f))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return written
