"""Exporting a safetensors encoder to ONNX once, for the ONNX Runtime embedding runner."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import msgspec
import torch

from lmaas.core.errors import ModelLoadError
from lmaas.core.messages import WorkerSpec
from lmaas.runtimes.hf_loading import load_hf_model

_log = logging.getLogger(__name__)

EXPORT_RECIPE = "encoder-last-hidden-state/dynamo/v1"
"""Names how :func:`export_encoder` builds a graph; part of the cache key, so a change here
re-exports instead of reusing an old graph."""

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "last_hidden_state"
_EXTERNAL_DATA_BYTES = 1 << 30
"""Above this many weight bytes the graph keeps its weights in a side file (protobuf's 2 GiB
limit, with room to spare)."""


class _LastHiddenState(torch.nn.Module):
    """The encoder with a plain tensor output (ONNX graphs have no ``ModelOutput``)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        return out


def export_encoder(spec: WorkerSpec, dest: Path) -> None:
    """Export the float32 encoder of ``spec.model_dir`` to ``dest``.

    The graph takes ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``, both axes
    dynamic) and returns ``last_hidden_state`` (``[batch, seq, hidden]``); pooling stays outside
    it, shared with the torch runner. The dynamo exporter is used: the TorchScript one bakes the
    traced sequence length into transformers' attention-mask code.

    Raises:
        ModelLoadError: the model cannot be loaded or exported.
    """
    # The float weights, whatever ``quantize`` says: quantisation happens on the exported graph.
    float_spec = msgspec.structs.replace(
        spec, options={k: v for k, v in spec.options.items() if k != "quantize"}
    )
    model, _ = load_hf_model(float_spec, "AutoModel", torch.float32)
    model.eval()
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    example = (torch.full((2, 8), 5, dtype=torch.long), torch.ones((2, 8), dtype=torch.long))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dynamic = {name: {0: batch, 1: seq} for name in INPUT_NAMES}
    chatter = io.StringIO()
    try:
        # The exporter prints progress lines and warns about internals: keep the log clean.
        with (
            contextlib.redirect_stdout(chatter),
            warnings.catch_warnings(),
            torch.inference_mode(False),
        ):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _LastHiddenState(model),
                example,
                str(dest),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamo=True,
                dynamic_shapes=dynamic,
                external_data=num_bytes > _EXTERNAL_DATA_BYTES,
                optimize=True,
            )
    except Exception as exc:  # the exporter raises many types; all mean "cannot export"
        _log.debug("exporter output:\n%s", chatter.getvalue())
        raise ModelLoadError(f"cannot export {Path(spec.model_dir).name} to ONNX: {exc}") from exc
    _log.info("exported %s to ONNX (%d MB of weights)", spec.model_name, num_bytes >> 20)
