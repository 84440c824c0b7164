"""``nnUNetv2_versemi_train``: stock ``nnUNetv2_train`` with the VerSemi trainers discoverable.

Same arguments as ``nnUNetv2_train``; ``-tr`` defaults to VerSemiTrainer. Equivalent to
``export nnUNet_extTrainer=...`` (see ``nnUNetv2_versemi_ext_trainer_path``) and ``nnUNetv2_train``.
"""

from __future__ import annotations

import sys

from nnunetv2_versemi.discovery import ensure_ext_trainer_env


def main(argv: list[str] | None = None) -> None:
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
