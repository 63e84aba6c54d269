"""The device the GPU tests run on: CUDA, or ``LMAAS_TEST_DEVICE`` (``cpu`` for a dry run)."""

from __future__ import annotations

import os

DEVICE = os.environ.get("LMAAS_TEST_DEVICE", "cuda")
