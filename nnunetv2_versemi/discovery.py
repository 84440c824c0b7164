"""Make stock nnU-Net commands find the VerSemi trainers through ``nnUNet_extTrainer``."""

from __future__ import annotations

import os

EXT_TRAINER_ENV = "nnUNet_extTrainer"


def ext_trainer_dir() -> str:
    """Folder holding only the module that re-exports this package's trainers (shipped in the package)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext")


def ensure_ext_trainer_env() -> str:
    """Add the re-export folder to ``nnUNet_extTrainer`` (keeping folders already listed there)."""
    folder = ext_trainer_dir()
    current = os.environ.get(EXT_TRAINER_ENV, "")
    parts = [p for p in current.split(os.pathsep) if p]
    if folder not in parts:
        os.environ[EXT_TRAINER_ENV] = os.pathsep.join([*parts, folder])
    return os.environ[EXT_TRAINER_ENV]


def export_line() -> str:
    return f"export {EXT_TRAINER_ENV}={ext_trainer_dir()}"
