"""Plans presets: JSON overlays that add (or change) configurations of an nnU-Net plans file.

An overlay is ``{"description": "...", "configurations": {NAME: {...}, ...}}``. Each entry is written into
``plans["configurations"][NAME]``. Entries normally inherit from a planned configuration
(``"inherits_from": "3d_fullres"``), nnU-Net's own mechanism for configuration variants: the new
configuration reuses the parent's preprocessed data (same ``data_identifier``), so nothing is preprocessed
again and the planned configurations stay untouched. Nested dicts (``architecture``) are merged key by key
into the parent's, so an overlay can change ``arch_kwargs.features_per_stage`` alone. An entry without
``inherits_from`` for an existing configuration is merged into it.

Presets shipped with the package (``nnunetv2_versemi/plans_presets/*.json``, same files as the repository's
``plans/``): ``paper_96`` (the VerSemi paper's 96^3 patch, batch 2) and ``cpu_demo`` (small CPU setting for
the demo data). Apply one to a plans file::

    nnUNetv2_versemi_plans_preset -d 950 --preset paper_96        # adds 3d_fullres_paper96
    nnUNetv2_versemi_benchmark plans -d 950 --preset cpu_demo               # same, via the benchmark CLI

Every resulting configuration is checked (patch divisible by the network's total stride per axis, one
``features_per_stage`` entry per stage, positive batch size) before the plans file is written. An entry with
``"fit_patch_to_network": true`` has its patch rounded up, axis by axis, to the next multiple of the planned
network's total stride, so a small CPU patch fits whatever geometry was planned (``cpu_demo`` does this). A
preset is applied as far as it fits: a configuration whose parent the plans lack (no ``3d_fullres`` for 2d
data) or that fails the checks is skipped and named; only a preset of which nothing fits is an error.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.nnunet_paths import preprocessed_folder

PRESET_DIR = Path(__file__).resolve().parent
_ALLOWED_TOP = {"description", "configurations"}


class PlansPresetError(VerSemiInputError):
    """The overlay is malformed or produces an unusable configuration."""


def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_overlay(name_or_path: str | os.PathLike) -> dict:
    """A shipped preset by name (``paper_96``) or any overlay JSON file by path."""
    p = Path(name_or_path)
    if not p.is_file():
        p = PRESET_DIR / f"{name_or_path}.json"
    if not p.is_file():
        raise PlansPresetError(
            f"No plans preset '{name_or_path}': not a file and not one of {', '.join(list_presets())}"
        )
    try:
        overlay = json.loads(p.read_text())
    except ValueError as e:
        raise PlansPresetError(f"Plans preset {p} is not valid JSON: {e}") from e
    _check_overlay(overlay, str(p))
    return overlay


def _check_overlay(overlay: dict, where: str) -> None:
    if not isinstance(overlay, dict) or not isinstance(overlay.get("configurations"), dict):
        raise PlansPresetError(f"{where}: an overlay is a JSON object with a 'configurations' object")
    unknown = sorted(set(overlay) - _ALLOWED_TOP)
    if unknown:
        raise PlansPresetError(
            f"{where}: unknown top-level key(s) {unknown}; allowed: {sorted(_ALLOWED_TOP)}"
        )
    for name, entry in overlay["configurations"].items():
        if not isinstance(entry, dict) or not entry:
            raise PlansPresetError(f"{where}: configuration '{name}' must be a non-empty object")


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _resolve(configs: dict, name: str, seen: tuple[str, ...] = ()) -> dict:
    if name not in configs:
        raise PlansPresetError(f"Configuration '{name}' is not in the plans (has: {', '.join(configs)})")
    if name in seen:
        raise PlansPresetError(f"Circular inherits_from: {' -> '.join((*seen, name))}")
    entry = configs[name]
    if "inherits_from" not in entry:
        return copy.deepcopy(entry)
    parent = _resolve(configs, entry["inherits_from"], (*seen, name))
    parent.update(copy.deepcopy(entry))  # nnU-Net's PlansManager resolves inheritance the same (shallow) way
    return parent


def total_stride(config: dict) -> list[int] | None:
    """The network's total stride per axis of a resolved configuration (None: the plans do not say)."""
    patch = config.get("patch_size")
    strides = config.get("architecture", {}).get("arch_kwargs", {}).get("strides")
    if not strides or not isinstance(patch, (list, tuple)):
        return None
    total = [1] * len(patch)
    for s in strides:
        s = s if isinstance(s, (list, tuple)) else [s] * len(patch)
        total = [t * int(x) for t, x in zip(total, s)]
    return total


def check_configuration(config: dict, name: str) -> None:
    """Raise :class:`PlansPresetError` when a resolved configuration cannot be trained."""
    patch = config.get("patch_size")
    bs = config.get("batch_size")
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise PlansPresetError(f"Configuration '{name}': batch_size must be a positive integer, got {bs!r}")
    if not isinstance(patch, (list, tuple)) or not all(isinstance(p, int) and p > 0 for p in patch):
        raise PlansPresetError(f"Configuration '{name}': patch_size must be positive integers, got {patch!r}")
    kwargs = config.get("architecture", {}).get("arch_kwargs", {})
    strides = kwargs.get("strides")
    if strides:
        if any(len(s) != len(patch) if isinstance(s, (list, tuple)) else False for s in strides):
            raise PlansPresetError(
                f"Configuration '{name}': patch_size {list(patch)} has {len(patch)} axes, the network's strides "
                f"{strides} another number"
            )
        total = total_stride(config)
        bad = [p for p, t in zip(patch, total) if p % t]
        if bad:
            raise PlansPresetError(
                f"Configuration '{name}': patch_size {list(patch)} is not divisible by the network's total stride "
                f"{total} per axis; choose multiples of {total} (or re-plan for this patch size)"
            )
    n_stages = kwargs.get("n_stages")
    for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
        value = kwargs.get(key)
        if n_stages is not None and isinstance(value, (list, tuple)) and len(value) != n_stages:
            raise PlansPresetError(
                f"Configuration '{name}': arch_kwargs.{key} has {len(value)} entries for {n_stages} stages"
            )


def apply_overlay(plans: dict, overlay: dict, skipped: list[str] | None = None) -> dict:
    """A copy of ``plans`` with the overlay's configurations added or merged, each checked.

    With a ``skipped`` list, a configuration that does not fit the plans is left out and the reason appended
    (an error only when nothing fits); without one, the first misfit raises :class:`PlansPresetError`."""
    _check_overlay(overlay, "overlay")
    out = copy.deepcopy(plans)
    configs = out.setdefault("configurations", {})
    reasons = []
    for name, entry in overlay["configurations"].items():
        before = copy.deepcopy(configs.get(name))
        try:
            _apply_entry(configs, name, entry)
        except PlansPresetError as e:
            if skipped is None:
                raise
            reasons.append(f"{name}: {e}")
            if before is None:
                configs.pop(name, None)
            else:
                configs[name] = before
    if reasons:
        if len(reasons) == len(overlay["configurations"]):
            raise PlansPresetError("no configuration of the preset fits these plans: " + "; ".join(reasons))
        skipped.extend(reasons)
    return out


def _apply_entry(configs: dict, name: str, entry: dict) -> None:
    entry = dict(entry)
    fit = bool(entry.pop("fit_patch_to_network", False))
    parent_name = entry.get("inherits_from")
    if parent_name is not None:
        if parent_name not in configs:
            raise PlansPresetError(
                f"Configuration '{name}' inherits from '{parent_name}', which the plans do not have "
                f"(they have: {', '.join(configs)})"
            )
        parent = _resolve(configs, parent_name)
        new = {"inherits_from": parent_name}
        for k, v in entry.items():
            if k == "inherits_from":
                continue
            # nnU-Net's inheritance replaces a nested dict as a whole: store the merged one
            new[k] = _deep_merge(parent[k], v) if isinstance(v, dict) and isinstance(parent.get(k), dict) else v
        configs[name] = new
    elif name in configs:
        configs[name] = _deep_merge(configs[name], entry)
    else:
        configs[name] = copy.deepcopy(entry)
    if fit:
        resolved = _resolve(configs, name)
        total = total_stride(resolved)
        if total is not None and len(total) == len(resolved["patch_size"]):
            configs[name]["patch_size"] = [-(-int(p) // t) * t for p, t in zip(resolved["patch_size"], total)]
    check_configuration(_resolve(configs, name), name)


def plans_file(dataset: str | int, plans_identifier: str = "nnUNetPlans") -> str:
    """``$nnUNet_preprocessed/<dataset>/<plans_identifier>.json``."""
    return os.path.join(preprocessed_folder(dataset), plans_identifier + ".json")


def apply_to_plans_file(
    path: str | os.PathLike, overlay: dict | str, output_identifier: str | None = None,
    skipped: list[str] | None = None,
) -> tuple[str, list[str]]:
    """Apply an overlay (dict, preset name or path) to a plans file.

    Without ``output_identifier`` the file is updated in place (only the overlay's configurations change);
    with one, a copy ``<output_identifier>.json`` (its ``plans_name`` set accordingly) is written next to it
    and the original stays as it is. Returns (written file, configuration names applied); with a ``skipped``
    list, configurations that do not fit are left out and named there (see :func:`apply_overlay`).
    """
    path = Path(path)
    if not path.is_file():
        raise PlansPresetError(f"Plans file {path} not found; plan the dataset first")
    if not isinstance(overlay, dict):
        overlay = load_overlay(overlay)
    plans = json.loads(path.read_text())
    reasons: list[str] = []
    new = apply_overlay(plans, overlay, reasons if skipped is not None else None)
    if skipped is not None:
        skipped.extend(reasons)
    target = path
    if output_identifier is not None:
        if os.sep in output_identifier or "__" in output_identifier:
            raise PlansPresetError(f"Plans identifier '{output_identifier}' must not contain '/' or '__'")
        new["plans_name"] = output_identifier
        target = path.with_name(output_identifier + ".json")
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(new, indent=4))
    os.replace(tmp, target)
    applied = [n for n in overlay["configurations"] if not any(r.startswith(f"{n}: ") for r in reasons)]
    return str(target), applied
