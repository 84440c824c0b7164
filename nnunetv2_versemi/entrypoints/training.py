"""``nnUNetv2_versemi_train`` (stock ``nnUNetv2_train`` with the VerSemi trainers discoverable; same
arguments, ``-tr`` defaults to VerSemiTrainer) and ``nnUNetv2_versemi_ext_trainer_path``."""

from __future__ import annotations

import argparse
import sys

from nnunetv2_versemi.discovery import ensure_ext_trainer_env, export_line


def train_main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-tr" not in argv and not any(a in ("-h", "--help") for a in argv):
        argv += ["-tr", "VerSemiTrainer"]
    ensure_ext_trainer_env()
    from nnunetv2.run.run_training import run_training_entry

    old = sys.argv
    sys.argv = ["nnUNetv2_versemi_train", *argv]
    try:
        run_training_entry()
    finally:
        sys.argv = old


def ext_trainer_path_main(argv: list[str] | None = None) -> None:
    """Print the line that makes stock nnU-Net commands find the VerSemi trainers."""
    argparse.ArgumentParser(prog="nnUNetv2_versemi_ext_trainer_path",
                            description=ext_trainer_path_main.__doc__).parse_args(argv)
    print(export_line())
