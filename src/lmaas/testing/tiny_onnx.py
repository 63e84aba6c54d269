"""Tiny ONNX models for tests and demos (random weights: their outputs mean nothing).

* :func:`build_tiny_mlp`: a dense network ``x FP32 [batch, 4] → y FP32 [batch, 3]``, the shape
  teams export from Keras or PyTorch;
* :func:`build_tiny_two_io`: two inputs of different types and two outputs;
* :func:`build_tiny_bf16`: a bfloat16 input and outputs (``x BF16 [batch, 3] → y BF16, z FP32``);
* :func:`build_tiny_onnx_embedder`: the tiny BERT embedder of
  :mod:`lmaas.testing.tiny_models` in ``onnx`` format (``model.onnx`` beside the tokenizer and
  the sentence-transformers files, no safetensors).

``python -m lmaas.testing.tiny_onnx DEST --kind mlp|two-io|bf16|embedding`` writes one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import warnings
from pathlib import Path

import torch

from lmaas.core.messages import WorkerSpec

MLP_IN, MLP_HIDDEN, MLP_OUT = 4, 8, 3


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(MLP_IN, MLP_HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(MLP_HIDDEN, MLP_OUT),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class _TwoInOut(torch.nn.Module):
    """``scaled = features * weight + offset.sum(-1)``; ``label = argmax(scaled)``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(MLP_IN))

    def forward(
        self, features: torch.Tensor, offset: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = features * self.weight + offset.sum(dim=-1, keepdim=True).to(features.dtype)
        return scaled, scaled.argmax(dim=-1)


def _export(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    dest: Path,
    inputs: list[str],
    outputs: list[str],
    *,
    dynamic_batch: bool = True,
) -> Path:
    """Export with the TorchScript exporter (a tenth of a second for these graphs, which have
    no data-dependent control flow), falling back to the dynamo exporter where it is gone."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch"} for name in inputs + outputs} if dynamic_batch else None
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module.eval(), example, str(dest), input_names=inputs, output_names=outputs,
                dynamo=False, dynamic_axes=axes, opset_version=17,
            )  # fmt: skip
        except Exception:  # the legacy exporter is deprecated; newer torch may lack it
            batch = torch.export.Dim("batch")
            shapes = {name: {0: batch} for name in inputs} if dynamic_batch else None
            torch.onnx.export(
                module.eval(), example, str(dest), input_names=inputs, output_names=outputs,
                dynamo=True, dynamic_shapes=shapes, external_data=False,
            )  # fmt: skip
    return dest


def build_tiny_mlp(dest: Path, *, seed: int = 0, dynamic_batch: bool = True) -> Path:
    """Write ``x FP32 [-1, 4] → y FP32 [-1, 3]`` (Linear, ReLU, Linear) to ``dest``; with
    ``dynamic_batch=False`` the batch axis is fixed at 2."""
    torch.manual_seed(seed)
    example = (torch.randn(2, MLP_IN),)
    return _export(_Mlp(), example, dest, ["x"], ["y"], dynamic_batch=dynamic_batch)


def build_tiny_two_io(dest: Path, *, seed: int = 0) -> Path:
    """Write ``features FP32 [-1, 4], offset INT64 [-1, 2] → scaled FP32 [-1, 4],
    label INT64 [-1]`` to ``dest``."""
    torch.manual_seed(seed)
    example = (torch.randn(2, MLP_IN), torch.ones(2, 2, dtype=torch.long))
    return _export(_TwoInOut(), example, dest, ["features", "offset"], ["scaled", "label"])


def build_tiny_bf16(dest: Path, *, seed: int = 0) -> Path:
    """Write ``x BF16 [-1, 3] → y BF16 [-1, 3], z FP32 [-1, 3]`` to ``dest``, where
    ``z = float(x) * w`` for a random FP32 ``w`` and ``y = bfloat16(z)`` (round to nearest even)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = torch.Generator().manual_seed(seed)
    w = torch.randn(MLP_OUT, generator=weight).numpy()
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "w"], ["z"]),
        helper.make_node("Cast", ["z"], ["y"], to=TensorProto.BFLOAT16),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch", MLP_OUT])],
        [
            helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["batch", MLP_OUT]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", MLP_OUT]),
        ],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    return dest


def build_tiny_onnx_embedder(dest: Path, *, seed: int = 0) -> Path:
    """Write the tiny sentence-transformers embedder into ``dest`` with ``model.onnx`` as its
    only weights (exported by the same code the ONNX Runtime backend uses)."""
    from lmaas.runtimes.onnx_export import export_encoder
    from lmaas.testing.tiny_models import build_tiny_embedder

    build_tiny_embedder(dest, seed=seed)
    spec = WorkerSpec(
        model_name="tiny",
        model_version="1",
        task="embedding",
        format="safetensors",
        model_dir=str(dest),
        files=[],
        requests_endpoint="",
        results_endpoint="",
        dtype="float32",
        device="cpu",
    )
    export_encoder(spec, dest / "model.onnx")
    (dest / "model.safetensors").unlink()
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmaas.testing.tiny_onnx",
        description="Build a tiny ONNX model with RANDOM weights (for tests and demos).",
    )
    parser.add_argument("dest", type=Path, help=".onnx file (mlp, two-io) or directory")
    parser.add_argument("--kind", choices=("mlp", "two-io", "bf16", "embedding"), default="mlp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    builders = {
        "mlp": build_tiny_mlp,
        "two-io": build_tiny_two_io,
        "bf16": build_tiny_bf16,
        "embedding": build_tiny_onnx_embedder,
    }
    print(builders[args.kind](args.dest, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
