"""The task table: which source dataset each task came from and how its labels map into the union.

The table is the contract between the merge (which writes it into the union dataset's dataset.json under
``"versemi"``), planning (which copies it into the plans file, so a trained model folder is self-contained),
the network (one prompt per task plus the synthetic task) and inference (source label values, intensity
transform). Merged label space: 0 = background, then every task's foreground classes in task order.

Serialized form (JSON)::

    {"version": 1,
     "tasks": [{"name": "CT", "source_dataset": "Dataset901_DemoCT",
                "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "channel": null,
                "normalization": {"scheme": "CT", "mean": .., "std": .., "lower": .., "upper": ..},
                "labels": [{"name": "organ", "source": 1, "merged": 1}],
                "labeled": ["CT_0001", ...], "unlabeled": [...], "test": [...]}, ...]}

``normalization.scheme`` is ``"CT"`` (clip to [lower, upper], then (x - mean) / std, with the task's own
foreground statistics) or ``"zscore"`` (per image, per channel).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nnunetv2_versemi.errors import VerSemiInputError

TABLE_KEY = "versemi"
TABLE_VERSION = 1


class TaskTableError(VerSemiInputError):
    """The task table is missing or inconsistent."""


@dataclass
class TaskLabel:
    name: str
    source: int
    merged: int


@dataclass
class Task:
    name: str
    source_dataset: str
    channel_names: dict[str, str]
    labels: list[TaskLabel]
    normalization: dict = field(default_factory=lambda: {"scheme": "zscore"})
    file_ending: str = ".nii.gz"
    channel: int | None = None
    labeled: list[str] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Output channels of this task's head: background + its foreground classes."""
        return 1 + len(self.labels)

    @property
    def merged_values(self) -> list[int]:
        return [lab.merged for lab in self.labels]

    @property
    def source_values(self) -> list[int]:
        return [lab.source for lab in self.labels]

    def source_to_merged_lut(self, size: int | None = None) -> np.ndarray:
        """Source label value -> merged value (values this task does not declare -> 0); ``size`` entries
        (default: the largest source value + 1)."""
        lut = np.zeros(size or max(self.source_values) + 1, dtype=np.int64)
        for lab in self.labels:
            lut[lab.source] = lab.merged
        return lut

    def merged_to_source_lut(self) -> np.ndarray:
        """Merged value -> this task's source label value (other tasks' values -> 0)."""
        lut = np.zeros(max(self.merged_values) + 1, dtype=np.int64)
        for lab in self.labels:
            lut[lab.merged] = lab.source
        return lut

    def merged_to_local_lut(self, num_merged_labels: int) -> np.ndarray:
        """Merged value -> class index of this task's head (1..K; other tasks' values and background -> 0)."""
        lut = np.zeros(num_merged_labels, dtype=np.int64)
        for ci, v in enumerate(self.merged_values, start=1):
            lut[v] = ci
        return lut

    def source_label_dict(self) -> dict[str, int]:
        """The ``labels`` entry of the source dataset.json (background first)."""
        return {"background": 0, **{lab.name: lab.source for lab in self.labels}}


@dataclass
class TaskTable:
    tasks: list[Task]
    version: int = TABLE_VERSION

    def __post_init__(self) -> None:
        self.validate()

    # ---- structure -------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def synthetic_prompt(self) -> int:
        """Prompt index of the synthetic "any foreground" task (after the T real tasks)."""
        return len(self.tasks)

    @property
    def num_prompts(self) -> int:
        return len(self.tasks) + 1

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def num_merged_labels(self) -> int:
        return 1 + sum(len(t.labels) for t in self.tasks)

    def num_classes_per_prompt(self) -> list[int]:
        """Head output channels per prompt: 1 + K_t for each task, 2 for the synthetic task."""
        return [t.num_classes for t in self.tasks] + [2]

    def per_task_mean(self, per_class: list[float]) -> dict[str, float]:
        """Task name -> mean of a per-merged-class score list (merged value v at index v - 1), ignoring NaN
        classes; NaN when all of a task's classes are NaN (none of them was seen)."""
        out = {}
        for t in self.tasks:
            vals = [float(per_class[v - 1]) for v in t.merged_values]
            finite = [v for v in vals if v == v]
            out[t.name] = sum(finite) / len(finite) if finite else float("nan")
        return out

    def index(self, name: str) -> int:
        for i, t in enumerate(self.tasks):
            if t.name == name:
                return i
        raise TaskTableError(f"Unknown task '{name}'. Valid tasks: {', '.join(self.names)}")

    def merged_label_dict(self) -> dict[str, int]:
        """The ``labels`` entry of the union dataset.json."""
        out = {"background": 0}
        for t in self.tasks:
            for lab in t.labels:
                out[f"{t.name}_{lab.name}"] = lab.merged
        return out

    def merged_to_local_lut(self) -> np.ndarray:
        """Merged value -> class index within its own task's head (background -> 0)."""
        return sum(t.merged_to_local_lut(self.num_merged_labels) for t in self.tasks)

    def local_to_merged_lut(self) -> np.ndarray:
        """(task, class index of its head) -> merged value, shape (T, max classes); background and the padding
        of tasks with fewer classes -> 0."""
        lut = np.zeros((self.num_tasks, max(self.num_classes_per_prompt())), dtype=np.int64)
        for ti, t in enumerate(self.tasks):
            lut[ti, 1:t.num_classes] = t.merged_values
        return lut

    def task_of_case(self, case_id: str) -> int:
        """Task index of a case id (labeled, unlabeled or test), from the lists, else by name prefix."""
        lookup = self._case_lookup()
        if case_id in lookup:
            return lookup[case_id]
        # longest matching "<task>_" prefix, so task names may share prefixes (e.g. "Lung" and "LungTumour")
        best = -1
        for i, t in enumerate(self.tasks):
            if case_id.startswith(t.name + "_") and (best < 0 or len(t.name) > len(self.tasks[best].name)):
                best = i
        if best < 0:
            raise TaskTableError(f"Case '{case_id}' belongs to no task of the table ({', '.join(self.names)})")
        return best

    def _case_lookup(self) -> dict[str, int]:
        if not hasattr(self, "_lookup_cache"):
            cache = {}
            for i, t in enumerate(self.tasks):
                for c in (*t.labeled, *t.unlabeled, *t.test):
                    cache[c] = i
            object.__setattr__(self, "_lookup_cache", cache)
        return self._lookup_cache

    # ---- validation --------------------------------------------------------------------------------
    def validate(self) -> None:
        if len(self.tasks) < 1:
            raise TaskTableError("The task table has no tasks")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise TaskTableError(f"Duplicate task names in the task table: {names}")
        merged = sorted(v for t in self.tasks for v in t.merged_values)
        if merged != list(range(1, len(merged) + 1)):
            raise TaskTableError(
                f"Merged label values must be 1..{len(merged)} without gaps or repeats, got {merged}"
            )
        for t in self.tasks:
            if not t.labels:
                raise TaskTableError(f"Task '{t.name}' has no foreground label")
            if "_" in t.name:
                raise TaskTableError(f"Task name '{t.name}' must not contain '_' (it prefixes case ids)")

    # ---- (de)serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": self.version, "tasks": [asdict(t) for t in self.tasks]}

    @classmethod
    def from_dict(cls, d: dict) -> TaskTable:
        try:
            tasks = []
            for td in d["tasks"]:
                td = dict(td)
                td["labels"] = [TaskLabel(**lab) for lab in td["labels"]]
                tasks.append(Task(**td))
            return cls(tasks=tasks, version=d.get("version", TABLE_VERSION))
        except (KeyError, TypeError) as e:
            raise TaskTableError(f"Malformed task table: {e!r}") from e

    @classmethod
    def from_dataset_json(cls, dataset_json: dict, where: str = "dataset.json") -> TaskTable:
        if TABLE_KEY not in dataset_json:
            raise TaskTableError(
                f"{where} has no '{TABLE_KEY}' task table. VerSemi trains on a union dataset made by "
                "nnUNetv2_versemi_merge."
            )
        return cls.from_dict(dataset_json[TABLE_KEY])

    @classmethod
    def from_plans(cls, plans: dict, where: str = "plans") -> TaskTable:
        if TABLE_KEY not in plans:
            raise TaskTableError(
                f"The {where} hold no '{TABLE_KEY}' task table. Plan the union dataset with "
                "nnUNetv2_versemi_plan_and_preprocess (or run it with --only-attach on existing plans)."
            )
        return cls.from_dict(plans[TABLE_KEY])

    def same_structure(self, other: TaskTable) -> bool:
        """True when both tables define the same tasks and label mapping (case lists may differ)."""
        def key(tt: TaskTable):
            return [(t.name, [(lab.name, lab.source, lab.merged) for lab in t.labels]) for t in tt.tasks]

        return key(self) == key(other)


# ---- finding the table of a dataset, a preprocessed folder or a model folder -----------------------------
def _json_object(path: Path) -> dict:
    from nnunetv2_versemi.inputs import read_json_object

    try:
        return read_json_object(path)
    except ValueError as e:
        raise TaskTableError(str(e)) from e


def table_from_folder(folder: str | os.PathLike) -> TaskTable | None:
    """The task table of a folder's dataset.json, else of its plans.json (model folders hold both); None when
    neither holds one."""
    folder = Path(folder)
    for name, loader in (("dataset.json", TaskTable.from_dataset_json), ("plans.json", TaskTable.from_plans)):
        f = folder / name
        if f.is_file():
            content = _json_object(f)
            if TABLE_KEY in content:
                return loader(content, where=str(f))
    return None


def table_with_counts(table: dict) -> dict:
    """A task table dict with each task's case lists replaced by their counts: what a log shows of it (the lists
    grow with the unlabeled pool)."""
    return {**table, "tasks": [{**t, **{k: f"{len(t[k])} cases" for k in ("labeled", "unlabeled", "test") if k in t}}
                               for t in table.get("tasks", [])]}


def find_task_table(dataset: str | int | None = None, path: str | os.PathLike | None = None) -> TaskTable:
    """The task table of a union dataset, from one of:

    - ``path``: a dataset.json or plans.json file, or a folder holding one (a raw or preprocessed dataset
      folder, a trained model folder);
    - ``dataset``: an id or name, looked up in $nnUNet_raw, then $nnUNet_preprocessed, then the model folders
      under $nnUNet_results (an existing path is accepted as well).
    """
    if path is not None:
        p = Path(path)
        if p.is_dir():
            table = table_from_folder(p)
            if table is None:
                raise TaskTableError(f"{p} holds no dataset.json or plans.json with a '{TABLE_KEY}' task table")
            return table
        if not p.is_file():
            raise TaskTableError(f"{p} does not exist")
        content = _json_object(p)
        if p.name == "plans.json" or (TABLE_KEY not in content and "plans_name" in content):
            return TaskTable.from_plans(content, where=str(p))
        return TaskTable.from_dataset_json(content, where=str(p))
    if dataset is None:
        raise TaskTableError("Give the union dataset (an id or name) or a path to its dataset.json")
    if Path(str(dataset)).exists():
        return find_task_table(path=dataset)

    from nnunetv2_versemi.nnunet_paths import dataset_name

    name = dataset_name(dataset)
    folders = [Path(os.environ[v]) / name for v in ("nnUNet_raw", "nnUNet_preprocessed") if os.environ.get(v)]
    if os.environ.get("nnUNet_results"):
        folders.extend(sorted(p for p in (Path(os.environ["nnUNet_results"]) / name).glob("*") if p.is_dir()))
    seen = []
    for folder in folders:
        if (folder / "dataset.json").is_file() or (folder / "plans.json").is_file():
            seen.append(str(folder))
            table = table_from_folder(folder)
            if table is not None:
                return table
    if not seen:
        raise TaskTableError(f"No dataset.json for {name} in $nnUNet_raw, $nnUNet_preprocessed or $nnUNet_results; "
                             "give the path of its dataset.json")
    raise TaskTableError(f"{name} has no '{TABLE_KEY}' task table (looked in {', '.join(seen)}): not a union "
                         "dataset made by nnUNetv2_versemi_merge")


def check_table_against_dataset(table: TaskTable, dataset_json: dict) -> None:
    """The plans' task table must describe the dataset being trained on."""
    ds_table = TaskTable.from_dataset_json(dataset_json)
    if not ds_table.same_structure(table):
        raise TaskTableError("The task table in the plans and the one in dataset.json disagree: re-run "
                             "nnUNetv2_versemi_plan_and_preprocess")
    labels = {k: int(v) for k, v in dataset_json["labels"].items()}
    if labels != table.merged_label_dict():
        raise TaskTableError(f"dataset.json labels {labels} do not match the task table's merged labels "
                             f"{table.merged_label_dict()}")
