"""Every test under tests/e2e/ carries the ``e2e`` marker (``python -m pytest -m e2e`` selects this layer)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    # a conftest hook sees every collected item, not only this folder's
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.e2e)
