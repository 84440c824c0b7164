"""How far the union's grid is from each task's own: the spacing nnU-Net's planner would pick for each task's labeled
cases alone, set against the union's planned spacing.

A union is preprocessed at one spacing per configuration, planned over the cases of all tasks. A task whose own
cases would be planned at another spacing is resampled into the union's grid, and a small structure can lose area
there (docs/BENCHMARKS.md, "Each task at its own spacing": on the `paper` demo tasks, Lung's tumour in a 1.125 mm
grid instead of its own 1.25 mm). ``nnUNetv2_versemi_plan_and_preprocess`` prints this report after planning.

Each task's spacing comes from the union's own planner class (``plans["experiment_planner_used"]``) run on the
task's rows of the union's ``dataset_fingerprint.json`` (its 50th-percentile rule, and the 10th percentile on an
anisotropic axis), transposed as in the union's plans; 2d takes the in-plane part, as nnU-Net's planner does.
"""

from __future__ import annotations

import os

import numpy as np

from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.tasktable import TaskTable

CONFIGURATIONS = ("2d", "3d_fullres")  # the configurations planned at the fingerprint's target spacing
REPORT_TOLERANCE = 0.05  # a task resampled by more than 5 % in any axis is named in the report


class TaskGridError(VerSemiInputError):
    """The fingerprint does not match the union's cases."""


def _planner_class(name: str) -> type:
    import nnunetv2
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                        current_module="nnunetv2.experiment_planning")
    return found if found is not None else ExperimentPlanner


def task_spacings(dataset_name: str, plans: dict, table: TaskTable) -> dict[str, dict[str, list[float]]]:
    """{configuration: {task: spacing}} for the 2d and 3d_fullres configurations of ``plans`` (in the plans' axis
    order), each task's spacing as the union's planner picks it for that task's labeled cases alone."""
    planner = _planner_class(plans.get("experiment_planner_used", "ExperimentPlanner"))(dataset_name)
    fingerprint = planner.dataset_fingerprint
    cases = list(planner.dataset.keys())  # the fingerprint's rows follow this order (nnU-Net's extractor)
    if len(cases) != len(fingerprint["spacings"]):
        raise TaskGridError(
            f"{dataset_name}: dataset_fingerprint.json has {len(fingerprint['spacings'])} cases, the dataset "
            f"{len(cases)}; extract the fingerprint again (nnUNetv2_versemi_plan_and_preprocess does)")
    transpose = list(plans["transpose_forward"])
    by_task: dict[str, list[float]] = {}
    for ti, task in enumerate(table.tasks):
        rows = [i for i, c in enumerate(cases) if table.task_of_case(c) == ti]
        if not rows:
            continue
        planner.dataset_fingerprint = {
            **fingerprint,
            "spacings": [fingerprint["spacings"][i] for i in rows],
            "shapes_after_crop": [fingerprint["shapes_after_crop"][i] for i in rows],
        }
        by_task[task.name] = [float(s) for s in np.asarray(planner.determine_fullres_target_spacing())[transpose]]
    planner.dataset_fingerprint = fingerprint
    out = {}
    for configuration in CONFIGURATIONS:
        if configuration in plans["configurations"]:
            out[configuration] = {
                name: (s[1:] if configuration == "2d" else s) for name, s in by_task.items()
            }
    return out


def describe_task_grids(plans: dict, spacings: dict[str, dict[str, list[float]]]) -> list[str]:
    """One line per configuration and task: its own spacing and the union's voxel size relative to it (> 1: the
    union's grid is coarser, the task loses detail; < 1: finer). Tasks off by more than REPORT_TOLERANCE in an axis
    are marked as resampled."""
    lines = []
    for configuration, per_task in spacings.items():
        union = np.asarray(plans["configurations"][configuration]["spacing"], float)
        lines.append(f"{configuration}: union grid {_mm(union)}")
        for name, own in per_task.items():
            ratio = union / np.asarray(own, float)
            coarser, finer = ratio > 1 + REPORT_TOLERANCE, ratio < 1 - REPORT_TOLERANCE
            kind = ("coarser in some axes, finer in others" if coarser.any() and finer.any() else "coarser" if coarser.any()
                    else "finer" if finer.any() else "")
            lines.append(f"  {name}: own {_mm(own)}, union / own {' x '.join(f'{r:.3g}' for r in ratio)}"
                         + (f" (resampled into a {kind} grid)" if kind else ""))
    return lines


def report_task_grids(dataset_name: str, plans: dict, table: TaskTable) -> list[str]:
    """The lines ``nnUNetv2_versemi_plan_and_preprocess`` prints after planning."""
    try:
        lines = describe_task_grids(plans, task_spacings(dataset_name, plans, table))
    except TaskGridError as e:
        return [f"WARNING: no per-task spacing report: {e}"]
    if any("resampled" in line for line in lines):
        lines.append("Tasks marked 'resampled' are trained and predicted in the union's grid, not their own; a small "
                     "structure can lose area there (docs/BENCHMARKS.md, 'Each task at its own spacing').")
    return lines


def _mm(spacing) -> str:
    return " x ".join(f"{s:.4g}" for s in spacing) + " mm"
