"""Warm start of a grown union from a trained VerSemi model: checkpoints for stock ``-pretrained_weights``.

nnU-Net's ``load_pretrained_weights`` (what ``nnUNetv2_train ... -pretrained_weights FILE`` calls) copies
weights key by key and refuses any shape difference: it cannot load a model trained on T tasks into the
network of T + N tasks. So ``nnUNetv2_versemi_add_task`` writes, per fold, the trained model's weights already
grown to the new task table (:mod:`nnunetv2_versemi.network.grow`): every key and shape of the new network,
which stock ``-pretrained_weights`` then loads unchanged. The EMA teacher starts from the loaded weights
(``VerSemiTrainer.on_train_start``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from os.path import isfile, join

import torch

from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.network.grow import GrowError, grow_state_dict
from nnunetv2_versemi.tasktable import TaskTable, TaskTableError

WARM_START_DIR = "versemi_warm_start"
CHECKPOINT_KEY = "versemi_warm_start"


class WarmStartError(VerSemiInputError):
    """The trained model cannot warm-start the grown union (not a VerSemi model, missing checkpoint, ...)."""


@dataclass
class TrainedModel:
    """A trained VerSemi model folder (``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``)."""
    dataset: str
    folder: str
    trainer: str
    plans_identifier: str
    configuration: str
    folds: list[str]
    checkpoint: str
    plans: dict
    dataset_json: dict
    table: TaskTable

    def checkpoint_file(self, fold: str) -> str:
        return join(self.folder, f"fold_{fold}", self.checkpoint)


def trainer_class(name: str) -> type:
    """A trainer class by name, found as nnU-Net finds it (our trainers through ``nnUNet_extTrainer``)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_versemi.discovery import ensure_ext_trainer_env

    ensure_ext_trainer_env()
    try:
        return recursive_find_trainer_class_by_name(name)
    except RuntimeError as e:
        raise WarmStartError(f"Unknown trainer {name}: {e}") from e


def load_trained_model(dataset: str | int, configuration: str, trainer: str, plans_identifier: str,
                       folds: list[str], checkpoint: str = "checkpoint_final.pth") -> TrainedModel:
    """The trained model, checked: its folder holds plans.json with a task table, dataset.json, and for each fold
    a checkpoint written by a VerSemiTrainer on that task table. Raises :class:`WarmStartError` otherwise."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunetv2_versemi.nnunet_paths import dataset_name
    from nnunetv2_versemi.training.trainer import VerSemiTrainer

    name = dataset_name(dataset)
    folder = get_output_folder(name, trainer, plans_identifier, configuration)
    for f in ("plans.json", "dataset.json"):
        if not isfile(join(folder, f)):
            raise WarmStartError(f"{folder} is not a trained model folder: {f} is missing (trained with -tr {trainer} "
                                 f"-p {plans_identifier} on configuration {configuration}?)")
    plans, dataset_json = load_json(join(folder, "plans.json")), load_json(join(folder, "dataset.json"))
    try:
        table = TaskTable.from_plans(plans, where=join(folder, "plans.json"))
    except TaskTableError as e:
        raise WarmStartError(f"{e}: {folder} is not a VerSemi model") from e
    cls = trainer_class(trainer)
    if not issubclass(cls, VerSemiTrainer):
        raise WarmStartError(f"Trainer {trainer} is not a VerSemiTrainer: {folder} is not a VerSemi model")
    model = TrainedModel(name, folder, trainer, plans_identifier, configuration, [str(f) for f in folds],
                         checkpoint, plans, dataset_json, table)
    for fold in model.folds:
        read_checkpoint(model, fold)
    return model


def read_checkpoint(model: TrainedModel, fold: str) -> dict:
    """A fold's checkpoint, checked to be a VerSemi checkpoint of the model's task table."""
    path = model.checkpoint_file(fold)
    if not isfile(path):
        raise WarmStartError(f"Missing checkpoint {path} (fold {fold}; --checkpoint picks another file)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # any unreadable file: name it
        raise WarmStartError(f"Cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ck, dict) or "network_weights" not in ck:
        raise WarmStartError(f"{path} is not an nnU-Net checkpoint (no network_weights)")
    state = ck.get("versemi")
    if not isinstance(state, dict) or "task_table" not in state:
        raise WarmStartError(f"{path} is not a VerSemi checkpoint (no 'versemi' entry with a task table; trainer "
                             f"{ck.get('trainer_name')})")
    if not TaskTable.from_dict(state["task_table"]).same_structure(model.table):
        raise WarmStartError(f"{path} was trained on other tasks than {join(model.folder, 'plans.json')} describes")
    return ck


def grown_network_weights(model: TrainedModel, fold: str, new_plans: dict, new_dataset_json: dict,
                          new_table: TaskTable) -> dict[str, torch.Tensor]:
    """The fold's trained weights grown to the network the model's trainer builds from ``new_plans``."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(new_plans)
    cm = pm.get_configuration(model.configuration)
    cls = trainer_class(model.trainer)
    network = cls.build_network_architecture(
        pm, cm, determine_num_input_channels(pm, cm, new_dataset_json),
        pm.get_label_manager(new_dataset_json).num_segmentation_heads, True)
    old = read_checkpoint(model, fold)["network_weights"]
    try:
        grown = grow_state_dict(old, network.state_dict(), model.table.num_tasks, new_table.num_tasks)
    except GrowError as e:
        raise WarmStartError(f"{model.checkpoint_file(fold)}: {e}") from e
    network.load_state_dict(grown)  # the network must take them exactly as stock -pretrained_weights gives them
    return grown


def write_warm_start(model: TrainedModel, preprocessed_folder: str, new_plans: dict, new_dataset_json: dict,
                     new_table: TaskTable) -> dict[str, str]:
    """One grown checkpoint per fold in ``<preprocessed_folder>/versemi_warm_start/``; returns {fold: file}."""
    out_dir = join(preprocessed_folder, WARM_START_DIR)
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for fold in model.folds:
        path = join(out_dir, f"{model.trainer}__{model.plans_identifier}__{model.configuration}__fold_{fold}.pth")
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save({"network_weights": grown_network_weights(model, fold, new_plans, new_dataset_json, new_table),
                    CHECKPOINT_KEY: {"model": model.folder, "fold": fold, "checkpoint": model.checkpoint,
                                     "old_tasks": model.table.names, "task_table": new_table.to_dict()}}, tmp)
        os.replace(tmp, path)
        files[fold] = path
    return files
