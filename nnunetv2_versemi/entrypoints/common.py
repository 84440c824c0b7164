"""Arguments shared by several commands, and the one way a command fails on bad input."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from nnunetv2_versemi.errors import VerSemiInputError

DEVICES = ("cuda", "cpu", "mps")


def add_device(p: argparse.ArgumentParser, default: str = "cuda") -> None:
    """``-device`` as nnU-Net spells it."""
    p.add_argument("-device", default=default, choices=DEVICES, help=f"device (default: {default})")


def add_processes(p: argparse.ArgumentParser, flag: str, help: str, default: int | None = None,
                  dest: str | None = None, nargs: str | None = None) -> None:
    """A worker-process count (``-np``, ``-npp``, ``-nps``, ...)."""
    kw = {"dest": dest} if dest else {}
    if nargs:
        kw["nargs"] = nargs
    p.add_argument(flag, type=int, default=default, help=help, **kw)


def default_processes() -> int:
    """nnU-Net's default worker count, at most the CPU count."""
    from nnunetv2.configuration import default_num_processes

    return min(default_num_processes, os.cpu_count() or 1)


@contextlib.contextmanager
def input_errors_exit(prog: str) -> Iterator[None]:
    """Bad input (:class:`VerSemiInputError`): ``<prog>: error: <message>`` on stderr and exit code 2, as
    argparse does for bad usage. Any other exception is a bug and keeps its traceback."""
    try:
        yield
    except VerSemiInputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
