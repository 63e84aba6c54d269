"""CUDA tests: run only where a GPU is present (``pytest tests/gpu``); CI deselects them.

``LMAAS_TEST_DEVICE=cpu`` runs them on the CPU instead (a dry run of the tests themselves).
They reuse the CPU runtime tests' helpers (``tests/unit/runtimes``), put on the path here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_RUNTIMES = Path(__file__).parents[1] / "unit" / "runtimes"
for helper_dir in (_RUNTIMES, _RUNTIMES / "paged"):
    if str(helper_dir) not in sys.path:
        sys.path.insert(0, str(helper_dir))

from gpu_device import DEVICE  # noqa: E402

from lmaas.testing.tiny_models import FAMILIES, build_tiny_causal_lm  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if DEVICE != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    here = Path(__file__).parent
    for item in items:  # the hook sees the whole session's items: mark only this folder's
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _exact_fp32() -> None:
    """No TF32 in fp32 matmuls: the equivalence tests compare token for token."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def tiny_lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lms-cuda")
    return {family: build_tiny_causal_lm(root / family, family) for family in FAMILIES}
