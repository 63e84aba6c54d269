"""What every lifecycle job shares: arguments, progress, measuring a version, registering it."""

from __future__ import annotations

import argparse
import io
import logging
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lmaas.core.errors import InvalidRequestError, LmaasError
from lmaas.core.messages import ClassifyRequest, ClassifyResult, RequestError, WorkerSpec
from lmaas.core.types import ModelFormat, Task
from lmaas.lifecycle.data import LabelledImages, LabelledTexts
from lmaas.registry.manifest import MANIFEST_FILENAME, Lineage, Manifest, MetricRecord
from lmaas.registry.service import RegistryService
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.catalog import create_runner

_log = logging.getLogger("lmaas.lifecycle")

EXIT_CANCELLED = 130
"""Exit status of a job cancelled with Ctrl-C (the shell's convention for SIGINT)."""

_EVAL_CHUNK = 64


def add_registry_args(parser: argparse.ArgumentParser) -> None:
    """``--home`` and ``--database-url``: the CLI resolves them from its settings."""
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--database-url", required=True)


def open_registry(args: argparse.Namespace) -> RegistryService:
    """The registry the CLI named (offline: a job never downloads)."""
    return RegistryService(args.home, args.database_url, offline=True)


def run_job(main: Callable[[], int]) -> int:
    """Run a job's body: logging to stderr, LmaasError → one line and 1, Ctrl-C → 130."""
    import transformers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        return main()
    except KeyboardInterrupt:
        print("cancelled: no version was registered", file=sys.stderr, flush=True)
        return EXIT_CANCELLED
    except LmaasError as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        return 1


@contextmanager
def no_interrupt() -> Iterator[None]:
    """Defer Ctrl-C: registering a version is short and must not stop half-way."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def register(
    registry: RegistryService,
    model_dir: Path,
    *,
    name: str,
    task: Task,
    lineage: Lineage,
    metrics: list[MetricRecord],
    serving: dict[str, Any] | None = None,
    description: str | None = None,
) -> Manifest:
    """Import ``model_dir`` as the next version of ``name``, with lineage and metrics."""
    with no_interrupt():
        return registry.import_model(
            str(model_dir),
            name=name,
            task=task,
            description=description,
            serving=serving,
            lineage=lineage,
            metrics=metrics,
        )


def metric(name: str, value: float, digest: str) -> MetricRecord:
    """A measurement taken now."""
    return MetricRecord(
        dataset_digest=digest, metric=name, value=float(value), measured_at=datetime.now(UTC)
    )


def dir_size(path: Path) -> int:
    """Bytes of the files in ``path`` (what the version will take on disk), manifest excluded."""
    return sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_FILENAME
    )


def root_training(registry: RegistryService, manifest: Manifest) -> dict[str, Any]:
    """The ``train`` lineage parameters at the root of ``manifest``'s ancestry, or ``{}``."""
    seen: set[str] = set()
    current: Manifest | None = manifest
    while current is not None and current.ref not in seen:
        seen.add(current.ref)
        lineage = current.lineage
        if lineage is None:
            return {}
        if lineage.transform == "train":
            return dict(lineage.parameters)
        current = registry.resolve(lineage.parent) if lineage.parent else None
    return {}


# ---------------------------------------------------------------- measuring a version


def worker_spec(
    name: str,
    model_dir: Path,
    task: Task,
    fmt: ModelFormat,
    options: dict[str, str] | None = None,
) -> WorkerSpec:
    """A spec for loading ``model_dir`` in this process exactly as a worker would."""
    return WorkerSpec(
        model_name=name,
        model_version="candidate",
        task=task.value,
        format=fmt.value,
        model_dir=str(model_dir),
        files=[],
        requests_endpoint="",
        results_endpoint="",
        dtype="float32",
        device="cpu",
        verify_checksums=False,
        options=dict(options or {}),
    )


class VersionProbe:
    """A version loaded through the serving runtime, to measure what clients will get.

    Args:
        spec: From :func:`worker_spec` (a candidate directory) or a registered version.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self._runner: Any = create_runner(spec)
        self.info = self._runner.load()
        self._batch = spec.max_batch_size

    def probabilities(self, requests: Sequence[ClassifyRequest]) -> np.ndarray:
        """Run the requests through preprocess/forward/postprocess; ``[rows, labels]``."""
        rows: list[np.ndarray] = []
        for result in run_batch(self._runner, list(requests), self._batch):
            if isinstance(result, RequestError):
                raise InvalidRequestError(f"the model refused a sample: {result.message}")
            if not isinstance(result, ClassifyResult):
                raise InvalidRequestError(f"unexpected result {type(result).__name__}")
            probs = np.frombuffer(result.probs, dtype="<f4")
            rows.append(probs.reshape(result.num_inputs, result.num_labels))
        return np.concatenate(rows)

    def latency_ms(self, request: ClassifyRequest, repeats: int = 30) -> float:
        """Median wall time of one single-input request (after one warm-up)."""
        self.probabilities([request])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.probabilities([request])
            times.append((time.perf_counter() - start) * 1000.0)
        return statistics.median(times)


def png_bytes(image: Any) -> bytes:
    """An image encoded as PNG, as a client would send it."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def image_requests(data: LabelledImages, indices: Sequence[int]) -> list[ClassifyRequest]:
    """Held-out images as v2-style requests of encoded PNGs, in chunks."""
    encoded = [png_bytes(data.images[i]) for i in indices]
    return [
        ClassifyRequest(request_id=f"eval-{n}", images=encoded[n : n + _EVAL_CHUNK])
        for n in range(0, len(encoded), _EVAL_CHUNK)
    ]


def text_requests(data: LabelledTexts, indices: Sequence[int]) -> list[ClassifyRequest]:
    """Held-out texts as requests, in chunks."""
    texts = [data.texts[i] for i in indices]
    return [
        ClassifyRequest(request_id=f"eval-{n}", texts=texts[n : n + _EVAL_CHUNK])
        for n in range(0, len(texts), _EVAL_CHUNK)
    ]


def accuracy(probs: np.ndarray, labels: Sequence[int]) -> float:
    """Top-1 accuracy of ``probs`` against integer ``labels``."""
    return float((probs.argmax(axis=1) == np.asarray(labels)).mean())
