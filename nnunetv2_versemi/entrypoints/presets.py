"""``nnUNetv2_versemi_plans_preset`` (also ``nnUNetv2_versemi_benchmark plans``): apply a plans preset."""

from __future__ import annotations

import argparse

from nnunetv2_versemi.entrypoints.common import input_errors_exit
from nnunetv2_versemi.plans_presets import (
    PlansPresetError,
    apply_to_plans_file,
    list_presets,
    load_overlay,
    plans_file,
)


def add_preset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", help="dataset id or name (its plans file in $nnUNet_preprocessed)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier to read (default: nnUNetPlans)")
    p.add_argument("--plans-file", help="a plans JSON file instead of -d/-p")
    p.add_argument("--preset", help=f"preset name ({', '.join(list_presets())}) or overlay JSON path")
    p.add_argument(
        "-o",
        dest="output_identifier",
        default=None,
        help="write a copy under this plans identifier instead of updating the file in place",
    )
    p.add_argument("--list", action="store_true", help="list the shipped presets and exit")


def run_preset_command(a: argparse.Namespace, prog: str) -> None:
    if a.list:
        for name in list_presets():
            print(f"{name}: {load_overlay(name).get('description', '')}")
        return
    with input_errors_exit(prog):
        if a.preset is None:
            raise PlansPresetError("give --preset NAME_OR_FILE (see --list)")
        if a.plans_file is None and a.d is None:
            raise PlansPresetError("give the dataset (-d) or --plans-file")
        path = a.plans_file or plans_file(a.d, a.p)
        skipped: list[str] = []
        written, names = apply_to_plans_file(path, a.preset, a.output_identifier, skipped)
    print(f"Wrote {written}: configuration(s) {', '.join(names)}")
    for reason in skipped:
        print(f"Skipped {reason}")


def presets_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_versemi_plans_preset",
        description="Apply a plans preset (JSON overlay) to an nnU-Net plans file.",
    )
    add_preset_arguments(p)
    run_preset_command(p.parse_args(argv), p.prog)
