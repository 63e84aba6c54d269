"""The line ``lmaas compress`` / ``lmaas convert`` print when they registered a version."""

from __future__ import annotations

import numpy as np

from lmaas.core.types import ModelFormat, Task
from lmaas.lifecycle.jobs.common import Measured, summary
from lmaas.registry.manifest import FileEntry, Lineage, Manifest


def _child() -> Manifest:
    return Manifest(
        name="sentiment", version="3", task=Task.CLASSIFICATION, format=ModelFormat.ONNX,
        architecture="BertForSequenceClassification", dtype="float32",
        files=[FileEntry(path="model.onnx", size_bytes=10, sha256="a" * 64)],
        source="sentiment:1 onnx-export",
        lineage=Lineage(parent="sentiment:1", transform="onnx-export", parameters={}),
    )  # fmt: skip


PARENT = Measured(accuracy=0.9, latency_ms=1.5, probs=np.zeros((1, 2)))
CHILD = Measured(accuracy=0.875, latency_ms=0.5, probs=np.zeros((1, 2)))


def test_a_smaller_version_reads_smaller() -> None:
    line = summary(_child(), PARENT, CHILD, 3.0)
    assert line == (
        "registered sentiment:3 from sentiment:1: accuracy 0.8750 (parent 0.9000, delta "
        "-0.0250), 3.00x smaller on disk, latency 0.50 ms (parent 1.50 ms) per single-input "
        "request"
    )


def test_a_larger_version_reads_larger_not_a_fraction_smaller() -> None:
    line = summary(_child(), PARENT, CHILD, 593012 / 612549)  # an ONNX export, 3% larger
    assert "1.03x larger on disk" in line and "smaller" not in line
