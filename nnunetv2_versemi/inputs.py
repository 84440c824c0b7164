"""Checks every command runs on its inputs and output paths before it loads a model or writes anything.

The functions raise ``ValueError`` with the reason (or return a problem string); each command wraps it in its
own :class:`~nnunetv2_versemi.errors.VerSemiInputError` with the file and case it was checking.
"""

from __future__ import annotations

import json
import os


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object (dict) in ``path``. Raises FileNotFoundError when the file is missing and ValueError when
    it is unreadable, not JSON or holds another JSON value (a dataset.json that is a list)."""
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a JSON {type(content).__name__}, expected a JSON object ({{...}})")
    return content


def output_folder_problem(path: str | os.PathLike, option: str = "-o") -> str | None:
    """Why ``path`` cannot become (or receive) an output folder: an existing file, or a parent that is a
    file; None when it can."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{option} {path} is an existing file, not a folder"
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        return f"{option} {path}: {parent} is a file, not a folder"
    if parent and not os.access(parent, os.W_OK):
        return f"{option} {path}: {parent} is not writable"
    return None
