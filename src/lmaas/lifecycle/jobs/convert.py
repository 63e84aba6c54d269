"""``lmaas convert --onnx``: export a classifier to ONNX, check parity, register it.

Run as ``python -m lmaas.lifecycle.jobs.convert REF --onnx`` (the CLI does). The new version is
the parent's directory with ``model.onnx`` (``pixel_values`` → ``logits``, dynamic batch) in
place of the safetensors weights; the registry sees format ``onnx`` and task
``image-classification``, and the worker serves it with
:class:`~lmaas.runtimes.vision.onnx.OnnxImageClassificationRunner` (the torch runner's image
decoding and preprocessing, the forward pass on ONNX Runtime), so clients keep the same API.

Parity: the parent's torch logits and the graph's logits on a sample set (the held-out images of
the training run, or ``--samples`` random pixel tensors when there is no data) must differ by at
most ``--max-abs-diff`` (1e-4) everywhere, and agree on the top-1 class for at least
``--min-top1-agreement`` (1.0) of the samples. Otherwise the job fails with both numbers and
registers nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmaas.core.errors import InvalidRequestError, LmaasError
from lmaas.core.messages import EmbedRequest, EmbedResult, WorkerSpec
from lmaas.core.types import ModelFormat, Task
from lmaas.lifecycle.jobs import onnx_export
from lmaas.lifecycle.jobs.common import (
    EvalSet,
    Measured,
    add_data_args,
    add_registry_args,
    comparison_metrics,
    copy_side_files,
    dir_size,
    eval_set,
    measure,
    metric,
    open_registry,
    register,
    run_job,
    spinner,
    summary,
    version_spec,
    worker_spec,
)
from lmaas.lifecycle.jobs.compress import load_float_model
from lmaas.registry.manifest import Lineage, Manifest, MetricRecord
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.catalog import create_runner
from lmaas.runtimes.onnx_export import (
    export_encoder,
    export_image_classifier,
    export_sequence_classifier,
    uses_segments,
)
from lmaas.runtimes.onnx_session import open_session

GRAPH_FILE = "model.onnx"


def parity(model: Any, graph: Path, pixels: torch.Tensor) -> tuple[float, float]:
    """``(max abs logit difference, top-1 agreement)`` of torch and ONNX Runtime on ``pixels``."""
    session = open_session(graph, 1)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.numpy()
    (actual,) = session.run(None, {"pixel_values": pixels.numpy()})
    diff = float(np.abs(expected - actual).max())
    agreement = float((expected.argmax(axis=1) == actual.argmax(axis=1)).mean())
    return diff, agreement


def _sample_pixels(processor: Any, images: list[Any] | None, count: int) -> torch.Tensor:
    if images:
        rgb = [img.convert("RGB") for img in images]
        pixels: torch.Tensor = processor(images=rgb, return_tensors="pt")["pixel_values"]
        return pixels.to(torch.float32)
    from PIL import Image

    probe = processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")["pixel_values"]
    generator = torch.Generator().manual_seed(0)
    return torch.randn((count, *probe.shape[1:]), generator=generator)


_SUPPORTED = (Task.IMAGE_CLASSIFICATION, Task.CLASSIFICATION, Task.RERANK, Task.EMBEDDING)
_SHORT_TEXTS = ("Hi", "Thanks", "No.", "OK")
"""Very short inputs join an embedding model's parity samples: they are the worst case for
numerics that depend on the sequence length."""


def convert(args: argparse.Namespace) -> int:
    """The job: export, check parity, measure, register."""
    if not args.onnx:
        raise InvalidRequestError("choose a target format: --onnx")
    with open_registry(args) as registry, tempfile.TemporaryDirectory() as tmp:
        parent = registry.resolve(args.model)
        _check_parent(parent, args)
        parent_dir = registry.model_dir(parent)
        data = _data(registry, parent, args)
        out = Path(tmp) / "version"
        out.mkdir()
        copy_side_files(parent_dir, out, lambda rel: not rel.name.startswith("model."))
        with spinner(f"exporting {parent.ref} to ONNX and checking parity"):
            if parent.task is Task.EMBEDDING:
                diff, agreement, samples = _embedding_graph(registry, parent, args, out)
            elif parent.task is Task.IMAGE_CLASSIFICATION:
                model = load_float_model(parent, parent_dir)
                diff, agreement, samples = _image_graph(parent_dir, model, data, args, out)
            else:
                model = load_float_model(parent, parent_dir)
                diff, agreement, samples = _text_graph(parent, parent_dir, model, data, args, out)
        agreeing = "cosine >= 1 - 1e-5" if parent.task is Task.EMBEDDING else "top-1 agreement"
        print(
            f"parity on {samples} samples: max abs diff {diff:.3g} (limit "
            f"{args.max_abs_diff:g}), {agreeing} {agreement:.4f} (minimum "
            f"{args.min_top1_agreement:g})",
            file=sys.stderr,
            flush=True,
        )
        if diff > args.max_abs_diff or agreement < args.min_top1_agreement:
            raise InvalidRequestError(
                f"parity check failed: max abs diff {diff:.3g} (limit {args.max_abs_diff:g}), "
                f"{agreeing} {agreement:.4f} (minimum {args.min_top1_agreement:g}); "
                "no version was created"
            )
        digest = data.digest if data else "random-samples"
        metrics = [
            metric("parity_max_abs_diff", diff, digest),
            metric(
                "parity_cosine_agreement"
                if parent.task is Task.EMBEDDING
                else "parity_top1_agreement",
                agreement,
                digest,
            ),
        ]
        options = {k: v for k, v in parent.serving.options.items() if k != "quantize"}
        serving = {**parent.serving.model_dump(), "options": options, "backend": "auto"}
        compared = _compare(registry, parent, out, data)
        if compared is None:
            metrics += [
                metric("size_bytes", dir_size(out), digest),
                metric("parent_size_bytes", parent.size_bytes, digest),
            ]
        else:
            metrics += compared[2]
        manifest = register(
            registry, out, name=args.name or parent.name, task=parent.task,
            lineage=Lineage(
                parent=parent.ref, transform="onnx-export",
                parameters={
                    "opset": "dynamo default", "max_abs_diff": args.max_abs_diff,
                    "min_top1_agreement": args.min_top1_agreement, "samples": samples,
                    "sample_source": "held-out data" if data else "random",
                },
            ),
            metrics=metrics, serving=serving,
            description=f"ONNX export of {parent.ref} by `lmaas convert`",
        )  # fmt: skip
        if compared is None:
            print(f"registered {manifest.ref} from {parent.ref}", flush=True)
        else:
            before, after, _ = compared
            ratio = parent.size_bytes / dir_size(out)
            print(summary(manifest, before, after, ratio), flush=True)
    return 0


def _compare(
    registry: Any, parent: Manifest, out: Path, data: EvalSet | None
) -> tuple[Measured, Measured, list[MetricRecord]] | None:
    """Parent and graph measured on ``data`` through their runtimes (None without data)."""
    if data is None:
        return None
    before = measure(version_spec(registry, parent), data)
    after = measure(worker_spec(parent.name, out, parent.task, ModelFormat.ONNX), data)
    metrics = comparison_metrics(before, after, parent.size_bytes, dir_size(out), data.digest)
    return before, after, metrics


def _check_parent(parent: Manifest, args: argparse.Namespace) -> None:
    if parent.task not in _SUPPORTED:
        raise InvalidRequestError(
            f"{parent.ref} is a {parent.task.value} model; ONNX conversion supports "
            "image-classification, classification, rerank and embedding models",
            param="model",
        )
    if parent.task is Task.RERANK and (args.data or args.sklearn_digits):
        raise InvalidRequestError(
            "a reranker has no labelled data to measure: drop --data (parity runs on random "
            "query/document pairs)",
            param="data",
        )
    if parent.task is Task.EMBEDDING and (args.data or args.sklearn_digits):
        raise InvalidRequestError(
            "an embedding model's parity runs on sample texts, not labelled data: drop --data "
            "(evaluate the new version with `lmaas eval` on (query, positive) pairs)",
            param="data",
        )
    if parent.task is Task.CLASSIFICATION and args.sklearn_digits:
        raise InvalidRequestError("--sklearn-digits are images; this is a text classifier")


def _data(registry: Any, parent: Manifest, args: argparse.Namespace) -> EvalSet | None:
    """The held-out data, or None (parity then runs on random samples, no accuracy)."""
    if parent.task in (Task.RERANK, Task.EMBEDDING):
        return None
    try:
        return eval_set(registry, parent, args)
    except LmaasError:
        if args.data or args.sklearn_digits:
            raise  # data named explicitly: its errors are the user's to see
        return None


def _image_graph(
    parent_dir: Path, model: Any, data: EvalSet | None, args: argparse.Namespace, out: Path
) -> tuple[float, float, int]:
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(str(parent_dir))  # type: ignore[no-untyped-call]
    pixels = _sample_pixels(processor, data.images if data else None, args.samples)
    export_image_classifier(model, tuple(pixels.shape[1:]), out / GRAPH_FILE)
    onnx_export.compact_graph(out / GRAPH_FILE)
    diff, agreement = parity(model, out / GRAPH_FILE, pixels)
    return diff, agreement, len(pixels)


def _embedding_graph(
    registry: Any, parent: Manifest, args: argparse.Namespace, out: Path
) -> tuple[float, float, int]:
    """Export the encoder as the embedding runtime does and compare the served vectors.

    Parity is measured on what clients get: the parent through its torch runtime and the graph
    through the ONNX Runtime embedding runner (same tokenisation, pooling and normalisation), on
    random texts plus very short ones. The "agreement" is the share of samples whose vectors
    have cosine >= 1 - 1e-5."""
    import transformers

    parent_spec = version_spec(registry, parent)
    parent_spec.options["backend"] = "torch"
    export_encoder(parent_spec, out / GRAPH_FILE)
    onnx_export.compact_graph(out / GRAPH_FILE)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(registry.model_dir(parent)), local_files_only=True
    )
    texts = [*onnx_export.random_texts(tokenizer, args.samples, seed=0), *_SHORT_TEXTS]
    options = {k: v for k, v in parent.serving.options.items() if k not in ("quantize", "backend")}
    child_spec = worker_spec(parent.name, out, Task.EMBEDDING, ModelFormat.ONNX, options)
    before = _embed(parent_spec, texts)
    after = _embed(child_spec, texts)
    cosine = np.sum(before * after, axis=1) / (
        np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1)
    )
    diff = float(np.max(np.abs(before - after)))
    return diff, float(np.mean(cosine >= 1.0 - 1e-5)), len(texts)


def _embed(spec: WorkerSpec, texts: list[str]) -> np.ndarray:
    """``texts`` embedded through the serving runtime of ``spec``: ``[len(texts), dim]``."""
    runner: Any = create_runner(spec)
    runner.load()
    rows: list[np.ndarray] = []
    requests = [EmbedRequest(request_id=str(i), texts=[t]) for i, t in enumerate(texts)]
    for result in run_batch(runner, requests, spec.max_batch_size):
        if not isinstance(result, EmbedResult):
            raise InvalidRequestError(f"the model refused a sample: {result}")
        rows.append(np.frombuffer(result.data, dtype="<f4").reshape(result.num_inputs, result.dim))
    return np.concatenate(rows)


def _text_graph(
    parent: Manifest,
    parent_dir: Path,
    model: Any,
    data: EvalSet | None,
    args: argparse.Namespace,
    out: Path,
) -> tuple[float, float, int]:
    import transformers

    trust = parent.serving.options.get("trust_remote_code") == "true"
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(parent_dir), local_files_only=True, trust_remote_code=trust
    )
    segments = uses_segments(model, tokenizer)
    if data is not None:
        texts = [t for request in data.requests for t in request.texts or []]
        documents = None
    else:
        texts = onnx_export.random_texts(tokenizer, args.samples, seed=0)
        is_pairs = parent.task is Task.RERANK
        documents = onnx_export.random_texts(tokenizer, args.samples, seed=1) if is_pairs else None
    export_sequence_classifier(model, segments, out / GRAPH_FILE)
    onnx_export.compact_graph(out / GRAPH_FILE)
    batches = onnx_export.sample_batches(model, tokenizer, texts, documents, segments)
    diff, agreement = onnx_export.text_parity(model, out / GRAPH_FILE, batches)
    return diff, agreement, len(texts)


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments (the CLI validates them first and passes them on)."""
    parser = argparse.ArgumentParser(prog="python -m lmaas.lifecycle.jobs.convert")
    parser.add_argument("model")
    parser.add_argument("--onnx", action="store_true")
    parser.add_argument("--name", default=None)
    parser.add_argument("--max-abs-diff", type=float, default=1e-4)
    parser.add_argument("--min-top1-agreement", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=64)
    add_data_args(parser)
    add_registry_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the job."""
    args = build_parser().parse_args(argv)
    return run_job(lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())
