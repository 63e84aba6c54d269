"""``lmaas compress``: int8 weights or magnitude pruning of a classifier.

Run as ``python -m lmaas.lifecycle.jobs.compress REF --int8|--prune FRACTION`` (the CLI does).
Either transform makes a new version (by default the next version of the same name) whose
manifest records the size, accuracy and latency against the parent, measured through the
serving runtime on the parent's held-out split:

* ``--int8``: every Linear weight stored as int8 with a float32 scale per output row
  (:mod:`lmaas.runtimes.int8_weights`), served with torch's dynamically quantised int8 Linear.
* ``--prune F``: the fraction ``F`` of smallest-magnitude weights of every Linear layer but the
  classification head set to zero, without fine-tuning; the weights stay dense float32 (the
  same size on disk), ready for a sparse runtime or a later ``--int8``.

A version in ONNX format (``lmaas convert --onnx``) takes ``--int8`` only: its graph is
quantised by onnxruntime (:func:`compress_onnx`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmaas.core.errors import InvalidRequestError
from lmaas.core.types import ModelFormat, Task
from lmaas.lifecycle.jobs.common import (
    EvalSet,
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
from lmaas.lifecycle.jobs.onnx_export import compact_graph
from lmaas.registry.manifest import Lineage, Manifest
from lmaas.registry.service import RegistryService
from lmaas.runtimes.int8_weights import INT8_WEIGHTS_FILE, save_int8
from lmaas.runtimes.onnx_int8 import INT8_RECIPE, quantize_int8

AUTO_CLASSES = {
    Task.IMAGE_CLASSIFICATION: "AutoModelForImageClassification",
    Task.CLASSIFICATION: "AutoModelForSequenceClassification",
    Task.RERANK: "AutoModelForSequenceClassification",
}
_HEAD_NAMES = ("classifier", "score", "lm_head")
_MEASURED = (Task.CLASSIFICATION, Task.IMAGE_CLASSIFICATION)
ONNX_GRAPH = "model.onnx"
_INT8_OPS = frozenset(
    {
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "QLinearMatMul",
        "ConvInteger",
    }
)


def load_float_model(parent: Manifest, model_dir: Path) -> Any:
    """The parent's float32 torch model.

    Raises:
        InvalidRequestError: not a safetensors classifier, or already int8.
    """
    import transformers

    if parent.task not in AUTO_CLASSES or parent.format is not ModelFormat.SAFETENSORS:
        raise InvalidRequestError(
            f"{parent.ref} is a {parent.task.value} model in {parent.format.value} format; "
            "this job supports classification, image-classification (and, for ONNX "
            "conversion, rerank) models in safetensors format",
            param="model",
        )
    if (model_dir / INT8_WEIGHTS_FILE).is_file() or parent.serving.options.get("quantize"):
        raise InvalidRequestError(f"{parent.ref} is already int8", param="model")
    trust = parent.serving.options.get("trust_remote_code") == "true"
    return getattr(transformers, AUTO_CLASSES[parent.task]).from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True, use_safetensors=True,
        trust_remote_code=trust,
    ).eval()  # fmt: skip


def prune_linear(model: torch.nn.Module, fraction: float) -> float:
    """Zero the ``fraction`` smallest-magnitude weights of each Linear layer but the head.

    Returns:
        The sparsity reached over the pruned layers' weights.
    """
    zeros = total = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] in _HEAD_NAMES:
                continue
            weight = module.weight
            count = round(fraction * weight.numel())
            if count > 0:
                threshold = weight.abs().flatten().kthvalue(count).values
                weight.masked_fill_(weight.abs() <= threshold, 0.0)
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / max(1, total)


def compress(args: argparse.Namespace) -> int:
    """The job: build the compressed copy, measure both, register the copy."""
    if not args.int8 and args.prune is None:
        raise InvalidRequestError("choose a transform: --int8 or --prune FRACTION")
    if args.prune is not None and not 0.0 < args.prune < 1.0:
        raise InvalidRequestError(f"--prune must be in (0, 1), got {args.prune}", param="prune")
    with open_registry(args) as registry, tempfile.TemporaryDirectory() as tmp:
        parent = registry.resolve(args.model)
        if parent.task not in _MEASURED:
            raise InvalidRequestError(
                f"{parent.ref} is a {parent.task.value} model; compression supports "
                "classification and image-classification models (their accuracy is measured)",
                param="model",
            )
        if parent.format is ModelFormat.ONNX:
            return compress_onnx(registry, parent, args, Path(tmp))
        if args.all_layers:
            raise InvalidRequestError(
                "--all-layers is for ONNX versions (onnxruntime int8); torch int8 quantises "
                "every Linear already",
                param="all_layers",
            )
        parent_dir = registry.model_dir(parent)
        model = load_float_model(parent, parent_dir)
        data: EvalSet = eval_set(registry, parent, args)
        out = Path(tmp) / "version"
        out.mkdir()
        copy_side_files(parent_dir, out, lambda rel: not rel.name.startswith("model."))
        options = dict(parent.serving.options)
        parameters: dict[str, Any] = {}
        extra = []
        if args.int8:
            save_int8(model, out)
            options["quantize"] = "int8"
            transform = "quantize-int8"
            parameters = {"scheme": "per-row symmetric int8 Linear weights, dynamic activations"}
        else:
            sparsity = prune_linear(model, args.prune)
            model.save_pretrained(str(out), safe_serialization=True)
            transform = "prune"
            parameters = {"target_sparsity": args.prune, "fine_tune": False}
            extra = [metric("sparsity", sparsity, data.digest)]
        serving = parent.serving.model_dump()
        serving["options"] = options
        if args.int8:  # int8 torch weights run on torch only, whatever the parent's backend
            serving["backend"] = "torch"
        before = measure(version_spec(registry, parent), data)
        child_options = {**options, "backend": serving["backend"]}
        spec = worker_spec(parent.name, out, parent.task, ModelFormat.SAFETENSORS, child_options)
        after = measure(spec, data)  # on the backend the child will be served with
        parent_bytes, child_bytes = parent.size_bytes, dir_size(out)
        metrics = comparison_metrics(before, after, parent_bytes, child_bytes, data.digest) + extra
        manifest = register(
            registry, out, name=args.name or parent.name, task=parent.task,
            lineage=Lineage(parent=parent.ref, transform=transform, parameters=parameters),
            metrics=metrics, serving=serving,
            description=f"{transform} of {parent.ref} by `lmaas compress`",
        )  # fmt: skip
        print(summary(manifest, before, after, parent_bytes / max(1, child_bytes)), flush=True)
    return 0


def compress_onnx(
    registry: RegistryService, parent: Manifest, args: argparse.Namespace, tmp: Path
) -> int:
    """``--int8`` of an ONNX version: an onnxruntime int8 graph.

    The recipe is the one the ONNX embedding runner uses at load time for ``quantize: int8``
    (:func:`lmaas.runtimes.onnx_int8.quantize_int8`): every MatMul with a constant weight gets
    int8 per-column weights and per-token int8 activations, with the few outlier input channels
    of text encoders kept in float; Gemm nodes go through onnxruntime's ``quantize_dynamic``;
    convolutions stay float unless ``--all-layers`` (smaller; the recorded accuracy delta says
    what it cost).
    The new version holds the quantised graph itself (format ``onnx``), served by the same
    ONNX Runtime runner as its parent.
    """
    if not args.int8:
        raise InvalidRequestError(
            f"{parent.ref} is an ONNX graph: pruning needs the torch weights (prune the "
            "safetensors version, then convert it); ONNX versions take --int8",
            param="prune",
        )
    parent_dir = registry.model_dir(parent)
    graph = parent_dir / ONNX_GRAPH
    if not graph.is_file():
        raise InvalidRequestError(f"{parent.ref} has no {ONNX_GRAPH}", param="model")
    if _is_quantized(graph):
        raise InvalidRequestError(f"{parent.ref} is already int8", param="model")
    data: EvalSet = eval_set(registry, parent, args)
    out = tmp / "version"
    out.mkdir()
    copy_side_files(parent_dir, out, lambda rel: not rel.name.startswith(ONNX_GRAPH))
    with spinner(f"quantising {parent.ref} with onnxruntime"):
        kept = quantize_int8(graph, out / ONNX_GRAPH, convolutions=args.all_layers)
    compact_graph(out / ONNX_GRAPH)
    before = measure(version_spec(registry, parent), data)
    after = measure(worker_spec(parent.name, out, parent.task, ModelFormat.ONNX), data)
    parent_bytes, child_bytes = parent.size_bytes, dir_size(out)
    metrics = comparison_metrics(before, after, parent_bytes, child_bytes, data.digest)
    manifest = register(
        registry, out, name=args.name or parent.name, task=parent.task,
        lineage=Lineage(
            parent=parent.ref, transform="quantize-int8",
            parameters={
                "backend": "onnxruntime",
                "recipe": INT8_RECIPE,
                "scheme": "per-column int8 MatMul weights, per-token int8 activations, "
                "outlier input channels in float; Gemm: quantize_dynamic",
                "gelu_fed_matmuls": "int8",
                "convolutions": "int8" if args.all_layers else "float",
                "float_channels": kept,
            },
        ),
        metrics=metrics, serving=parent.serving.model_dump(),
        description=f"onnxruntime int8 of {parent.ref} by `lmaas compress`",
    )  # fmt: skip
    print(summary(manifest, before, after, parent_bytes / max(1, child_bytes)), flush=True)
    return 0


def _is_quantized(graph: Path) -> bool:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return any(node.op_type in _INT8_OPS for node in model.graph.node)


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments (the CLI validates them first and passes them on)."""
    parser = argparse.ArgumentParser(prog="python -m lmaas.lifecycle.jobs.compress")
    parser.add_argument("model")
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--prune", type=float, default=None)
    parser.add_argument("--all-layers", action="store_true")
    parser.add_argument("--name", default=None)
    add_data_args(parser)
    add_registry_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the job."""
    args = build_parser().parse_args(argv)
    return run_job(lambda: compress(args))


if __name__ == "__main__":
    sys.exit(main())
