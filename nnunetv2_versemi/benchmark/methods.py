"""The benchmark's vocabulary: its methods (a)-(f) and trainer-named ablations, the training budget, one
training run and the benchmark context every phase reads (see :mod:`.comparison`)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from os.path import join

from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunetv2_versemi.discovery import ensure_ext_trainer_env
from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.tasktable import TaskTable
from nnunetv2_versemi.training.trainer import VerSemiTrainer

PROG = "nnUNetv2_versemi_benchmark"
BENCH_TAG = "vsbench"
STATE_DIR = "runs"
PRED_DIR = "predictions"
EVAL_DIR = "evaluation"
LOG_FILE = "benchmark.log"
CHECKPOINT = "checkpoint_final.pth"


class BenchmarkError(VerSemiInputError):
    """Bad input to the benchmark; raised before anything is trained."""


@dataclass(frozen=True)
class Method:
    key: str
    letter: str
    label: str
    trainer: str
    per_task: bool = False
    prompted: bool = False
    unlabeled: bool = False  # trains on the union's unlabeled images (their preprocessed files must all be there)


METHODS = (
    Method("alone", "a", "(a) nnU-Net, each task alone", "nnUNetTrainer", per_task=True),
    Method("union", "b", "(b) nnU-Net on the union", "nnUNetTrainer"),
    Method("noUnsup", "c", "(c) VerSemi, labeled only", "VerSemiTrainer_noUnsup", prompted=True),
    Method("versemi", "d", "(d) VerSemi", "VerSemiTrainer", prompted=True, unlabeled=True),
    Method("pseudo", "e", "(e) nnU-Net with pseudo labels, each task alone", "nnUNetTrainer", per_task=True),
    Method("alonePCD", "f", "(f) nnU-Net, each task alone, present-class Dice", "nnUNetTrainer_presentClassDice",
           per_task=True),
    Method("aloneFg67", "g", "(g) nnU-Net, each task alone, foreground oversampling 0.67",
           "nnUNetTrainer_foreground67", per_task=True),
)
PSEUDO = "pseudo"
DEFAULT_METHODS = ("a", "b", "c", "d", "e")
BASELINE = "alone"


def method_by_name(name: str) -> Method:
    """One of the four methods by letter or key, or any trainer nnU-Net finds by class name (an ablation such
    as ``VerSemiTrainer_dynamicHead``), trained on the union like (b)-(d)."""
    for m in METHODS:
        if name in (m.key, m.letter):
            return m

    cls = None
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        ensure_ext_trainer_env()  # nnU-Net finds this package's trainers through nnUNet_extTrainer
        try:
            cls = recursive_find_trainer_class_by_name(name)
        except RuntimeError:  # nnU-Net raises when no trainer has that name
            cls = None
    if cls is None:
        valid = ", ".join(f"{m.letter}/{m.key}" for m in METHODS)
        raise BenchmarkError(f"Unknown method '{name}'; choose from {valid} or a trainer class name")
    versemi = issubclass(cls, VerSemiTrainer)
    return Method(name, name, name, name, prompted=versemi, unlabeled=versemi and cls.config.uses_unlabeled)


@dataclass(frozen=True)
class Budget:
    epochs: int = 1000
    iterations: int = 250
    val_iterations: int = 50

    def __post_init__(self):
        for k, v in asdict(self).items():
            if v < 1:
                raise BenchmarkError(f"--{k.replace('_', '-')} must be at least 1, got {v}")

    def tag(self) -> str:
        return f"e{self.epochs}-i{self.iterations}-v{self.val_iterations}"


def bench_plans_identifier(plans: str, budget: Budget, preset: str | None = None) -> str:
    """Plans identifier of the benchmark's copy of the plans: budget (and preset) in the name."""
    middle = f"-{re.sub(r'[^A-Za-z0-9]+', '', preset)}" if preset else ""
    return f"{plans}_{BENCH_TAG}{middle}-{budget.tag()}"


@dataclass
class TrainingRun:
    """One method on one dataset (each task is its own run for method a), all requested folds."""
    method: Method
    dataset: str
    plans: str
    configuration: str
    folds: list
    test_cases: list[str]
    task: str | None = None
    task_index: int | None = None
    local_to_merged: list[int] | None = None  # per-task methods: task class index -> merged value
    budget: Budget = field(default_factory=Budget)
    prepare: Callable[[], None] | None = None  # writes the run's dataset when it needs other runs' models (e)

    @property
    def name(self) -> str:
        return self.method.key if self.task is None else f"{self.method.key}-{self.task}"

    @property
    def trainer(self) -> str:
        return self.method.trainer

    def model_folder(self) -> str:
        return get_output_folder(self.dataset, self.trainer, self.plans, self.configuration)

    def checkpoint(self, fold) -> str:
        return join(self.model_folder(), f"fold_{fold}", CHECKPOINT)


@dataclass
class BenchmarkContext:
    union: str
    union_id: int
    table: TaskTable
    raw: str
    pp: str
    configuration: str
    plans: str
    bench_plans: str
    budget: Budget
    folds: list
    out: str
    budget_per: str
    device: str
    npp: int
    tta: bool
    skip_val: bool
    test_cases: dict[str, list[str]]  # task name -> test case ids with a label
    file_ending: str
    num_channels: int
    methods: list[Method] = field(default_factory=list)
    preset: str | None = None
    base_configuration: str = ""  # the configuration whose preprocessed data ``configuration`` uses
    data_identifier: str = ""
    plans_content: dict = field(default_factory=dict)
    claimed_ids: set[int] = field(default_factory=set)

    def log(self, msg: str) -> None:
        line = f"[{PROG} {datetime.now().strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        os.makedirs(self.out, exist_ok=True)
        with open(join(self.out, LOG_FILE), "a") as f:
            f.write(line + "\n")
