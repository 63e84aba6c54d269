"""Issue 4's torch runtimes on CUDA give what they give on the CPU (fp32)."""

from __future__ import annotations

import io
import struct
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gpu_device import DEVICE
from PIL import Image
from runtimes_helpers import make_spec

from lmaas.core.messages import (
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    RerankRequest,
    SamplingParams,
    ScoreResult,
    TranscribeRequest,
    TranscriptionResult,
)
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.classification.torch import TorchTextClassificationRunner
from lmaas.runtimes.embedding.torch import TorchEmbeddingRunner
from lmaas.runtimes.rerank.torch import TorchRerankRunner
from lmaas.runtimes.seq2seq.torch import TorchSeq2SeqRunner
from lmaas.runtimes.speech.torch import TorchWhisperRunner
from lmaas.runtimes.vision.torch import TorchImageClassificationRunner
from lmaas.testing.tiny_models import build_tiny_embedder
from lmaas.testing.tiny_seq2seq import build_tiny_seq2seq
from lmaas.testing.tiny_speech import build_tiny_whisper
from lmaas.testing.tiny_text_heads import build_tiny_classifier, build_tiny_cross_encoder
from lmaas.testing.tiny_vision import build_tiny_image_classifier


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _wav(seconds: float) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    samples = (0.4 * np.sin(2 * np.pi * (200 + 300 * t) * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


def _floats(data: bytes) -> np.ndarray:
    return np.array(struct.unpack(f"<{len(data) // 4}f", data))


CASES: dict[str, tuple[Callable[[Path], Path], type, str, list[InferRequest]]] = {
    "embedding": (
        build_tiny_embedder,
        TorchEmbeddingRunner,
        "embedding",
        [EmbedRequest("e", texts=["hello world", "a longer sentence for the encoder"])],
    ),
    "rerank": (
        build_tiny_cross_encoder,
        TorchRerankRunner,
        "rerank",
        [RerankRequest("r", "what do cats eat", ["fish", "stocks fell today", "cats"])],
    ),
    "classify": (
        build_tiny_classifier,
        TorchTextClassificationRunner,
        "classification",
        [ClassifyRequest("c", texts=["great", "awful product"])],
    ),
    "vision": (
        build_tiny_image_classifier,
        TorchImageClassificationRunner,
        "image-classification",
        [ClassifyRequest("v", images=[_png(1), _png(2)])],
    ),
    "speech": (
        build_tiny_whisper,
        TorchWhisperRunner,
        "speech-to-text",
        [TranscribeRequest("s", _wav(2.0), language="en")],
    ),
}


def _values(result: Any) -> Any:
    if isinstance(result, EmbedResult):
        return _floats(result.data)
    if isinstance(result, ClassifyResult):
        return _floats(result.probs)
    if isinstance(result, ScoreResult):
        return np.array(result.scores)
    assert isinstance(result, TranscriptionResult), result
    return result.text


@pytest.mark.parametrize("case", sorted(CASES))
def test_batch_runner_on_cuda_matches_cpu(tmp_path: Path, case: str) -> None:
    build, runner_class, task, requests = CASES[case]
    model_dir = build(tmp_path / case)
    outputs = []
    for device in ("cpu", DEVICE):
        runner = runner_class(make_spec(model_dir, task=task, device=device, dtype="float32"))
        runner.load()
        outputs.append([_values(r) for r in run_batch(runner, requests)])
    for on_cpu, on_device in zip(*outputs, strict=True):
        if isinstance(on_cpu, str):
            assert on_device == on_cpu
        else:
            np.testing.assert_allclose(on_device, on_cpu, atol=1e-4, rtol=1e-4)


def test_seq2seq_on_cuda_matches_cpu(tmp_path: Path) -> None:
    model_dir = build_tiny_seq2seq(tmp_path / "bart", "bart")
    texts = {}
    for device in ("cpu", DEVICE):
        runner = TorchSeq2SeqRunner(make_spec(model_dir, task="seq2seq", device=device))
        runner.load()
        greedy = SamplingParams(max_tokens=16, temperature=0.0)
        for i, prompt in enumerate(["hello there", "a much longer input sentence", "x"]):
            runner.add_request(GenerateRequest(f"{device}{i}", greedy, prompt=prompt))
            # Beam search: its rows are gathered by beam origin on the device each step.
            beams = SamplingParams(max_tokens=16, temperature=0.0, num_beams=4, n=2)
            runner.add_request(GenerateRequest(f"{device}b{i}", beams, prompt=prompt))
        out: dict[str, str] = {}
        while runner.has_work():
            for delta in runner.step():
                key = f"{delta.request_id.removeprefix(device)}.{delta.index}"
                out[key] = out.get(key, "") + delta.text
        texts[device] = out
    assert texts[DEVICE] == texts["cpu"]
