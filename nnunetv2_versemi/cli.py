"""Console entry points. Each command lives in its own module; imports are lazy so that
``--help`` stays fast and a command only loads what it needs."""

from __future__ import annotations

import importlib


def _run(module: str, argv: list[str] | None = None) -> None:
    importlib.import_module(module).main(argv)


def demo_data_entry(argv: list[str] | None = None) -> None:
    _run("nnunetv2_versemi.data.demo", argv)


def merge_entry(argv: list[str] | None = None) -> None:
    _run("nnunetv2_versemi.data.merge", argv)


def plan_and_preprocess_entry(argv: list[str] | None = None) -> None:
    _run("nnunetv2_versemi.data.preprocess", argv)


def train_entry(argv: list[str] | None = None) -> None:
    _run("nnunetv2_versemi.training.run", argv)


def predict_entry(argv: list[str] | None = None) -> None:
    _run("nnunetv2_versemi.inference.predict", argv)


def evaluate_entry(argv: list[str] | None = None) -> None:
    _run("nnunetv2_versemi.evaluation.evaluate", argv)


def benchmark_entry(argv: list[str] | None = None) -> None:
    _run("nnunetv2_versemi.benchmark.run", argv)


def demo_entry(argv: list[str] | None = None) -> None:
    _run("nnunetv2_versemi.demo", argv)


def ext_trainer_path_entry(argv: list[str] | None = None) -> None:
    """Print the line that makes stock nnU-Net commands find the VerSemi trainers."""
    import argparse

    from nnunetv2_versemi.discovery import export_line

    argparse.ArgumentParser(description=ext_trainer_path_entry.__doc__).parse_args(argv)
    print(export_line())
