"""``nnUNetv2_versemi_plan_and_preprocess``: stock nnU-Net planning + preprocessing of a union dataset, plus
the VerSemi steps.

1. Stock nnU-Net fingerprint extraction, experiment planning and preprocessing of the labeled cases
   (``nnunetv2.experiment_planning.plan_and_preprocess_api``), unchanged.
2. The task table is copied into the plans file (``plans["versemi"]``), so a trained model folder, which
   holds a copy of the plans, is self-contained for inference.
3. ``splits_final.json`` stratified by task (:mod:`nnunetv2_versemi.data.splits`), labeled cases only.
4. The unlabeled images are preprocessed with the same plans and configuration by the configuration's own
   preprocessor into ``<data_identifier>_unlabeled/`` next to nnU-Net's ``<data_identifier>/`` folder, in
   the same blosc2 format (``.b2nd`` data, an all-zero int8 ``_seg.b2nd``, ``.pkl`` properties).

If you ran ``nnUNetv2_plan_and_preprocess`` yourself, ``--only-attach`` adds the task table and splits and
``--only-unlabeled`` preprocesses the unlabeled images.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import time

import numpy as np

from nnunetv2_versemi.data.splits import SPLITS_FILE, describe_splits, splits_match_table, write_splits
from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.nnunet_paths import dataset_name
from nnunetv2_versemi.tasktable import TABLE_KEY, TaskTable, find_task_table

UNLABELED_SUFFIX = "_unlabeled"
DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
DEFAULT_NP = {"2d": 8, "3d_fullres": 4, "3d_lowres": 8}  # nnU-Net's defaults per configuration


class PreprocessError(VerSemiInputError):
    """The dataset or plans are not what VerSemi preprocessing needs."""


def unlabeled_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    """Folder of the preprocessed unlabeled cases of a configuration (next to nnU-Net's labeled folder)."""
    return os.path.join(preprocessed_dataset_folder_base, data_identifier + UNLABELED_SUFFIX)


def _names(dataset_name_or_id: str | int) -> tuple[str, str, str]:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    name = dataset_name(dataset_name_or_id)
    raw = os.path.join(str(nnUNet_raw), name) if nnUNet_raw.is_set() else ""
    return name, raw, os.path.join(str(nnUNet_preprocessed), name)


def attach_task_table(dataset_id: str | int, plans_identifier: str = "nnUNetPlans") -> TaskTable:
    """Store the union's task table in ``nnUNet_preprocessed/<dataset>/<plans_identifier>.json``.

    Needed after every (re-)planning: nnU-Net's planner writes the plans file from scratch.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    name, _, pp = _names(dataset_id)
    table = find_task_table(name)
    plans_file = os.path.join(pp, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise PreprocessError(f"Plans file {plans_file} not found; run the planning first")
    plans = load_json(plans_file)
    plans[TABLE_KEY] = table.to_dict()
    save_json(plans, plans_file, sort_keys=False)
    return table


def _unlabeled_files(name: str, raw: str, table: TaskTable, file_ending: str, num_channels: int) -> dict:
    from nnunetv2_versemi.data.merge import UNLABELED_DIR

    files, missing = {}, []
    for t in table.tasks:
        for case in t.unlabeled:
            fs = [
                os.path.join(raw, UNLABELED_DIR, f"{case}_{c:04d}{file_ending}") for c in range(num_channels)
            ]
            missing += [f for f in fs if not os.path.isfile(f)]
            files[case] = fs
    if missing:
        shown = "\n  ".join(missing[:10])
        raise PreprocessError(
            f"Dataset {name}: {len(missing)} unlabeled image file(s) listed in the task table are missing:\n  {shown}"
        )
    return files


def _preprocess_unlabeled_case(args: tuple) -> str:
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    case, files, out_truncated, plans, configuration, dataset_json = args
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    preprocessor = cm.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case(files, None, pm, cm, dataset_json)
    data = data.astype(np.float32, copy=False)
    # no label: an all-zero seg keeps the file layout of labeled cases, so nnU-Net's dataset class loads it
    seg = np.zeros((1, *data.shape[1:]), dtype=np.int8)
    # nnU-Net's loaders look up class_locations when oversampling foreground; none here -> random crops
    lm = pm.get_label_manager(dataset_json)
    keys = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    properties["class_locations"] = {(tuple(k) if isinstance(k, list) else k): [] for k in keys}
    # chunks/blocks as DefaultPreprocessor.run_case_save computes them for this configuration's patch size
    block_data, chunk_data = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    block_seg, chunk_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
    nnUNetDatasetBlosc2.save_case(
        data,
        seg,
        properties,
        out_truncated,
        chunks=chunk_data,
        blocks=block_data,
        chunks_seg=chunk_seg,
        blocks_seg=block_seg,
    )
    return case


def preprocess_unlabeled(
    dataset_name_or_id: str | int,
    plans_identifier: str = "nnUNetPlans",
    configurations: list[str] | tuple[str, ...] = DEFAULT_CONFIGURATIONS,
    num_processes: int | list[int] = 4,
    progress: bool = True,
) -> dict[str, str]:
    """Preprocess the union's unlabeled images for each configuration; returns {configuration: folder}.

    Uses the plans file and the configuration's own preprocessor class, exactly as nnU-Net preprocesses
    labeled cases (with no segmentation). Configurations missing from the plans are skipped, like nnU-Net does.
    An existing unlabeled folder of a configuration is replaced.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name, raw, pp = _names(dataset_name_or_id)
    plans_file = os.path.join(pp, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise PreprocessError(f"Plans file {plans_file} not found; run the planning first")
    plans = load_json(plans_file)
    # the preprocessed copy of dataset.json, as nnU-Net's preprocessor reads it
    dj_file = os.path.join(pp, "dataset.json")
    dataset_json = load_json(dj_file if os.path.isfile(dj_file) else os.path.join(raw, "dataset.json"))
    table = find_task_table(name)
    files = _unlabeled_files(
        name, raw, table, dataset_json["file_ending"], len(dataset_json["channel_names"])
    )
    pm = PlansManager(plans)
    nps = list(num_processes) if isinstance(num_processes, (list, tuple)) else [num_processes]
    if len(nps) == 1:
        nps = nps * len(configurations)
    if len(nps) != len(configurations):
        raise PreprocessError(f"Got {len(nps)} process counts for {len(configurations)} configurations")
    out = {}
    for configuration, n in zip(configurations, nps):
        if configuration not in pm.available_configurations:
            print(f"INFO: configuration {configuration} is not in {plans_identifier}.json of {name}; skipped")
            continue
        folder = unlabeled_folder(pp, pm.get_configuration(configuration).data_identifier)
        _preprocess_unlabeled_into(folder, files, plans, configuration, dataset_json, n, progress)
        out[configuration] = folder
    return out


def _preprocess_unlabeled_into(folder: str, files: dict[str, list[str]], plans: dict, configuration: str,
                               dataset_json: dict, n: int, progress: bool) -> None:
    """Replaces ``folder`` with the preprocessed unlabeled cases ``files`` ({case: channel files}) of one
    configuration, in ``n`` spawned workers (1: in this process)."""
    from tqdm import tqdm

    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    jobs = [
        (c, fs, os.path.join(folder, c), plans, configuration, dataset_json) for c, fs in files.items()
    ]
    desc = f"Preprocessing unlabeled ({configuration})"
    if n <= 1 or len(jobs) <= 1:
        for j in tqdm(jobs, desc=desc, disable=not progress):
            _preprocess_unlabeled_case(j)
    else:
        with multiprocessing.get_context("spawn").Pool(min(n, len(jobs))) as pool:
            for _ in tqdm(
                pool.imap_unordered(_preprocess_unlabeled_case, jobs),
                total=len(jobs),
                desc=desc,
                disable=not progress,
            ):
                pass


def missing_unlabeled(
    preprocessed_dataset_folder_base: str, data_identifier: str, table: TaskTable
) -> list[str]:
    """Unlabeled cases of the table without preprocessed files for this configuration (for the trainer)."""
    folder = unlabeled_folder(preprocessed_dataset_folder_base, data_identifier)
    have = set()
    if os.path.isdir(folder):
        have = {
            f[: -len(".b2nd")]
            for f in os.listdir(folder)
            if f.endswith(".b2nd") and not f.endswith("_seg.b2nd")
        }
    return [c for t in table.tasks for c in t.unlabeled if c not in have]


def _drop_stale_splits(name: str, raw: str, pp: str, table: TaskTable) -> None:
    """nnU-Net's planner asserts that a preprocessed splits file equals the raw one; a re-merge changes both."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    target = os.path.join(pp, SPLITS_FILE)
    if not os.path.isfile(target):
        return
    try:
        current = load_json(target)
    except ValueError:
        current = None
    if current is None or not splits_match_table(current, table):
        print(f"Removing {target}: it does not match the labeled cases of {name} (stale after a re-merge)")
        os.remove(target)
        return
    source = os.path.join(raw, SPLITS_FILE)
    if os.path.isfile(source) and load_json(source) != current:
        raise PreprocessError(
            f"{target} differs from {source}; nnU-Net's planner refuses that. Delete one of them or copy your "
            "splits into the other."
        )


@contextlib.contextmanager
def planner_safe_da_env():
    """nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0 (training without
    augmentation workers): plan with 1 there and restore the variable afterwards."""
    da = os.environ.get("nnUNet_n_proc_DA")
    if da == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        if da == "0":
            os.environ["nnUNet_n_proc_DA"] = da


def plan_and_preprocess(
    dataset_name_or_id: str | int,
    configurations: list[str] | tuple[str, ...] = DEFAULT_CONFIGURATIONS,
    num_processes: list[int] | None = None,
    num_processes_fingerprint: int = 8,
    planner: str = "ExperimentPlanner",
    gpu_memory_target: float | None = None,
    overwrite_plans_name: str | None = None,
    verify_dataset_integrity: bool = False,
    progress: bool = True,
    verbose: bool = False,
) -> str:
    """Everything ``nnUNetv2_versemi_plan_and_preprocess`` does for one dataset; returns the plans identifier."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    name, raw, pp = _names(dataset_name_or_id)
    table = find_task_table(name)  # fail early when this is not a union dataset
    dataset_id = convert_dataset_name_to_id(name)
    nps = num_processes or [DEFAULT_NP.get(c, 4) for c in configurations]
    _drop_stale_splits(name, raw, pp, table)

    timings = {}
    t = time.time()
    print("Fingerprint extraction...")
    # clean=True: a re-merged union must not reuse the fingerprint of its previous version
    extract_fingerprints(
        [dataset_id],
        "DatasetFingerprintExtractor",
        num_processes_fingerprint,
        verify_dataset_integrity,
        True,
        verbose,
        show_progress_bar=progress,
    )
    timings["fingerprint"], t = time.time() - t, time.time()
    print("Experiment planning...")
    with planner_safe_da_env():
        plans_identifier = plan_experiments(
            [dataset_id], planner, gpu_memory_target, "DefaultPreprocessor", None, overwrite_plans_name
        )
    attach_task_table(name, plans_identifier)
    _describe_task_grids(name, pp, plans_identifier, table)
    _write_and_describe_splits(pp, table)
    timings["planning"], t = time.time() - t, time.time()
    print("Preprocessing...")
    preprocess([dataset_id], plans_identifier, list(configurations), nps, verbose, show_progress_bar=progress)
    timings["preprocessing"], t = time.time() - t, time.time()
    print("Preprocessing unlabeled images...")
    preprocess_unlabeled(name, plans_identifier, configurations, nps, progress)
    timings["unlabeled"] = time.time() - t
    print("Done: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return plans_identifier


def _describe_task_grids(name: str, pp: str, plans_identifier: str, table: TaskTable) -> None:
    """Each task's own planned spacing against the union's grid (:mod:`nnunetv2_versemi.data.task_grid`)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunetv2_versemi.data.task_grid import report_task_grids

    print("Each task's own spacing against the union's grid:")
    for line in report_task_grids(name, load_json(os.path.join(pp, plans_identifier + ".json")), table):
        print(f"  {line}")


def _write_and_describe_splits(pp: str, table: TaskTable) -> None:
    """Task-stratified splits in the preprocessed folder (kept where they match), and a summary of them."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    path, written = write_splits(pp, table)
    print(f"{'Wrote' if written else 'Kept'} task-stratified splits {path}")
    for line in describe_splits(load_json(path), table):
        print(f"  {line}")
