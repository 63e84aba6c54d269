"""The folder sets the marker: tests/unit → unit, tests/integration → integration, and so on."""

from __future__ import annotations

from pathlib import Path

import pytest

_TESTS = Path(__file__).parent
_FOLDER_MARKERS = ("unit", "contract", "integration", "e2e", "gpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(_TESTS).parts
        if parts and parts[0] in _FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
