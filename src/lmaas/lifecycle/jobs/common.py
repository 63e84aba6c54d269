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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lmaas.core.errors import InvalidRequestError, LmaasError
from lmaas.core.messages import ClassifyRequest, ClassifyResult, RequestError, WorkerSpec
from lmaas.core.types import ModelFormat, Task
from lmaas.lifecycle.data import LabelledImages, LabelledTexts
from lmaas.lifecycle.job_table import emit_event
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

    # A server started in the background (``nohup lmaas serve &``) passes SIGINT ignored to its
    # children, and Python then leaves it ignored: the job could not be cancelled (only killed
    # after the grace period). Cancelling is SIGINT, so take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    for chatty in ("onnx_ir", "onnxscript", "alembic"):  # per-pass and migration chatter
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return main()
    except KeyboardInterrupt:
        print("cancelled: no version was registered", file=sys.stderr, flush=True)
        return EXIT_CANCELLED
    except LmaasError as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        emit_event("error", code=exc.code, message=exc.message)
        return 1


@contextmanager
def no_interrupt() -> Iterator[None]:
    """Defer Ctrl-C: registering a version is short and must not stop half-way."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def spinner(label: str) -> Iterator[None]:
    """A spinner with elapsed time on stderr, for a step that reports no progress of its own."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        progress.add_task(label, total=None)
        yield


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
        manifest = registry.import_model(
            str(model_dir),
            name=name,
            task=task,
            description=description,
            serving=serving,
            lineage=lineage,
            metrics=metrics,
            source_label=f"{lineage.parent or parameters_source(lineage)} {lineage.transform}",
        )
    emit_event("result", result=registered_summary(manifest, lineage, metrics))
    return manifest


def registered_summary(
    manifest: Manifest, lineage: Lineage, metrics: list[MetricRecord]
) -> dict[str, Any]:
    """What ``GET /admin/jobs/{id}`` shows as a job's result: the new version, its metrics
    and its lineage."""
    return {
        "version": manifest.ref,
        "metrics": {m.metric: m.value for m in metrics},
        "lineage": {
            "parent": lineage.parent,
            "transform": lineage.transform,
            "parameters": dict(lineage.parameters),
        },
    }


class ProgressEvents:
    """``start`` and ``progress`` events of a job's main loop (at most ~4 a second)."""

    def __init__(self, total: int, description: str) -> None:
        self._done, self._last = 0, 0.0
        emit_event("start", total=total, description=description)

    def advance(self, steps: int = 1) -> None:
        self._done += steps
        now = time.monotonic()
        if now - self._last >= 0.25:
            self._last = now
            emit_event("progress", done=self._done)

    def finish(self) -> None:
        emit_event("progress", done=self._done)


def parameters_source(lineage: Lineage) -> str:
    """Where a training run's data came from (its ``data`` parameter)."""
    return str(lineage.parameters.get("data", "data"))


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
    """A spec for loading ``model_dir`` in this process exactly as a worker would.

    One intra-op thread unless the options say otherwise: parent and child are timed alike,
    and a shared machine's other load perturbs one thread least.
    """
    options = {"num_threads": "1", **(options or {})}
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
        options=options,
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


# ---------------------------------------------------------------- the data a version is measured on


@dataclass(frozen=True, slots=True)
class EvalSet:
    """Held-out examples to compare a transformed version with its parent."""

    requests: list[ClassifyRequest]
    labels: list[int]
    digest: str
    sample: ClassifyRequest
    """One single-input request, for latency."""
    images: list[Any] | None = None


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--data`` / ``--sklearn-digits``: the held-out data (default: the training run's)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", default=None)
    source.add_argument("--sklearn-digits", action="store_true")


def eval_set(registry: RegistryService, parent: Manifest, args: argparse.Namespace) -> EvalSet:
    """The held-out split of the data the parent (or its root ancestor) was trained on.

    ``--data`` or ``--sklearn-digits`` name other data (all of it is then used).

    Raises:
        InvalidRequestError: no data given and none recorded in the lineage.
    """
    from lmaas.lifecycle import data as datasets

    params = root_training(registry, parent)
    explicit = bool(args.sklearn_digits or args.data)
    source = datasets.DIGITS_SOURCE if args.sklearn_digits else (args.data or params.get("data"))
    if not source:
        raise InvalidRequestError(
            f"{parent.ref} was not trained by `lmaas train`: pass --data (or --sklearn-digits) "
            "to measure the new version against it",
            param="data",
        )
    if parent.task is Task.CLASSIFICATION:
        texts = datasets.load_texts(Path(source))
        test = _held_out(len(texts.labels), params, explicit)
        requests = text_requests(texts, test)
        sample = ClassifyRequest("latency", texts=[texts.texts[test[0]]])
        labels = _in_model_order([texts.labels[i] for i in test], texts.label_names, parent)
        return EvalSet(requests, labels, datasets.texts_digest(texts, test), sample)
    images = (
        datasets.load_digits_images()
        if source == datasets.DIGITS_SOURCE
        else datasets.load_image_folder(Path(source))
    )
    test = _held_out(len(images.labels), params, explicit)
    requests = image_requests(images, test)
    sample = ClassifyRequest("latency", images=[png_bytes(images.images[test[0]])])
    chosen = [images.images[i] for i in test]
    labels = _in_model_order([images.labels[i] for i in test], images.label_names, parent)
    return EvalSet(requests, labels, datasets.images_digest(images, test), sample, chosen)


def _in_model_order(labels: list[int], names: list[str], parent: Manifest) -> list[int]:
    """The data's label indices (into its sorted ``names``) as indices of the model's labels.

    Raises:
        InvalidRequestError: a label of the data is not one of the model's.
    """
    if not parent.labels:
        return labels
    index = {name: i for i, name in enumerate(parent.labels)}
    unknown = sorted({names[label] for label in labels} - index.keys())
    if unknown:
        raise InvalidRequestError(
            f"the data has labels {parent.ref} does not know: {', '.join(unknown[:5])} (its "
            f"labels: {', '.join(parent.labels[:10])})",
            param="data",
        )
    return [index[names[label]] for label in labels]


def _held_out(count: int, params: dict[str, Any], explicit: bool) -> list[int]:
    from lmaas.lifecycle import data as datasets

    if explicit:
        return list(range(count))
    parts = datasets.split(
        count,
        test_fraction=float(params.get("test_split", 0.2)),
        val_fraction=float(params.get("val_split", 0.15)),
        seed=int(params.get("seed", 0)),
    )
    return parts.test or parts.val


def version_spec(registry: RegistryService, manifest: Manifest) -> WorkerSpec:
    """A registered version's spec, to load it in this process as a worker would."""
    spec = worker_spec(
        manifest.name, registry.model_dir(manifest), manifest.task, manifest.format,
        dict(manifest.serving.options),
    )  # fmt: skip
    if manifest.serving.backend != "auto":
        spec.options.setdefault("backend", manifest.serving.backend)
    return spec


@dataclass(frozen=True, slots=True)
class Measured:
    """Accuracy and latency of one version on an :class:`EvalSet`."""

    accuracy: float
    latency_ms: float
    probs: np.ndarray


def measure(spec: WorkerSpec, data: EvalSet) -> Measured:
    """Load ``spec`` through its serving runtime and measure it on ``data``."""
    probe = VersionProbe(spec)
    probs = probe.probabilities(data.requests)
    return Measured(accuracy(probs, data.labels), probe.latency_ms(data.sample), probs)


def comparison_metrics(
    parent: Measured, child: Measured, parent_bytes: int, child_bytes: int, digest: str
) -> list[MetricRecord]:
    """The child's accuracy, size and latency, and their change against the parent."""
    return [
        metric("accuracy", child.accuracy, digest),
        metric("accuracy_delta", child.accuracy - parent.accuracy, digest),
        metric("parent_accuracy", parent.accuracy, digest),
        metric("size_bytes", child_bytes, digest),
        metric("parent_size_bytes", parent_bytes, digest),
        metric("size_ratio", parent_bytes / max(1, child_bytes), digest),
        metric("latency_ms", child.latency_ms, digest),
        metric("parent_latency_ms", parent.latency_ms, digest),
    ]


def copy_side_files(source: Path, dest: Path, keep: Callable[[Path], bool]) -> None:
    """Copy the files of a version that ``keep`` accepts (config, tokenizer, processor)."""
    import shutil

    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and path.name != MANIFEST_FILENAME and keep(relative):
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / relative)


def summary(manifest: Manifest, parent: Measured, child: Measured, ratio: float) -> str:
    """The one line a job prints when it registered a version (``ratio``: parent bytes over
    child bytes)."""
    # An ONNX export can be a little larger than its parent: "0.97x smaller" reads as a riddle.
    size = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
    return (
        f"registered {manifest.ref} from {manifest.lineage.parent if manifest.lineage else '?'}: "
        f"accuracy {child.accuracy:.4f} (parent {parent.accuracy:.4f}, delta "
        f"{child.accuracy - parent.accuracy:+.4f}), {size} on disk, latency "
        f"{child.latency_ms:.2f} ms (parent {parent.latency_ms:.2f} ms) per single-input request"
    )
