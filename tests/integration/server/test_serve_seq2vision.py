"""A real server with real workers serving a tiny seq2seq model and a tiny image classifier."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import transformers
from openai import BadRequestError, OpenAI
from PIL import Image

from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_seq2seq import build_tiny_seq2seq
from lmaas.testing.tiny_vision import TINY_LABELS, build_tiny_image_classifier
from tests.integration.serverproc import ServerProcess, start_server

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Every model version"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq2vision-models")
    return {
        "s2s": build_tiny_seq2seq(root / "tiny-marian", "marian"),
        "vit": build_tiny_image_classifier(root / "tiny-vit"),
    }


@pytest.fixture(scope="module")
def s2v_server(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]
) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("seq2vision-home")
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    registry.import_model(str(model_dirs["s2s"]), name="tiny-s2s")
    registry.import_model(str(model_dirs["vit"]), name="tiny-vit")
    registry.close()
    proc = start_server(home, ["tiny-s2s", "tiny-vit"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _greedy_reference(path: Path, text: str, max_new_tokens: int) -> str:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(
            **tokenizer(text, return_tensors="pt"), do_sample=False, max_new_tokens=max_new_tokens
        )
    return str(tokenizer.decode(out[0], skip_special_tokens=True))


def _beam_reference(path: Path, text: str, max_new_tokens: int, **kwargs: object) -> list[str]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(
            **tokenizer(text, return_tensors="pt"),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
    return [str(t) for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def _png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _vit_reference(path: Path, files: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values, probabilities) from transformers' processor and model."""
    processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    model = transformers.AutoModelForImageClassification.from_pretrained(str(path))
    images = [Image.open(io.BytesIO(f)).convert("RGB") for f in files]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = torch.softmax(model(pixel_values=pixels).logits, dim=-1)
    return pixels.numpy(), probs.numpy()


def test_completions_on_seq2seq_stream_and_not(
    s2v_server: ServerProcess, model_dirs: dict[str, Path]
) -> None:
    client = OpenAI(base_url=f"{s2v_server.base_url}/v1", api_key="unused", max_retries=0)
    for prompt in PROMPTS:
        whole = client.completions.create(
            model="tiny-s2s", prompt=prompt, max_tokens=8, temperature=0
        )
        assert whole.choices[0].text == _greedy_reference(model_dirs["s2s"], prompt, 8)
        assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 8
        chunks = list(
            client.completions.create(
                model="tiny-s2s",
                prompt=prompt,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert streamed == whole.choices[0].text
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_beam_search_returns_generates_text(
    s2v_server: ServerProcess, model_dirs: dict[str, Path]
) -> None:
    """num_beams as an extra body parameter: generate()'s text; n=2 the two best beams;
    streamed, the text comes as one chunk at the end; usage counts the returned tokens."""
    client = OpenAI(base_url=f"{s2v_server.base_url}/v1", api_key="unused", max_retries=0)
    prompt, path = PROMPTS[0], model_dirs["s2s"]
    beams = _beam_reference(path, prompt, 8, num_beams=4, num_return_sequences=2)
    whole = client.completions.create(
        model="tiny-s2s", prompt=prompt, max_tokens=8, extra_body={"num_beams": 4}
    )
    assert whole.choices[0].text == beams[0]
    two = client.completions.create(
        model="tiny-s2s", prompt=prompt, max_tokens=8, n=2, extra_body={"num_beams": 4}
    )
    assert [c.text for c in two.choices] == beams
    assert two.usage is not None and whole.usage is not None
    assert whole.usage.completion_tokens <= 8 < two.usage.completion_tokens <= 16
    chunks = list(
        client.completions.create(
            model="tiny-s2s",
            prompt=prompt,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"num_beams": 4},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert texts == [beams[0]]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with pytest.raises(BadRequestError, match="temperature"):
        client.completions.create(
            model="tiny-s2s", prompt=prompt, temperature=0.7, extra_body={"num_beams": 4}
        )
    with pytest.raises(BadRequestError, match="num_beams"):
        client.completions.create(model="tiny-s2s", prompt=prompt, n=3, extra_body={"num_beams": 2})
    url = f"{s2v_server.base_url}/v2/models/tiny-s2s/infer"
    body = {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [prompt]}],
        "parameters": {"max_tokens": 8, "num_beams": 4},
    }
    reply = httpx.post(url, json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["data"] == [beams[0]]


def test_seq2seq_refusals_keep_the_worker_up(s2v_server: ServerProcess) -> None:
    client = OpenAI(base_url=f"{s2v_server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError, match="/v1/completions"):
        client.chat.completions.create(
            model="tiny-s2s", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(BadRequestError, match="maximum input length"):
        client.completions.create(model="tiny-s2s", prompt="word " * 600, max_tokens=4)
    with pytest.raises(BadRequestError, match="logprobs"):
        client.completions.create(model="tiny-s2s", prompt="hi", max_tokens=4, logprobs=1)
    ok = client.completions.create(model="tiny-s2s", prompt="hi", max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_v2_infer_on_seq2seq(s2v_server: ServerProcess, model_dirs: dict[str, Path]) -> None:
    url = f"{s2v_server.base_url}/v2/models/tiny-s2s"
    meta = httpx.get(url).json()
    assert meta["platform"] == "lmaas_seq2seq" and meta["inputs"][0]["name"] == "text_input"
    body = {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPTS[0]]}],
        "parameters": {"max_tokens": 6, "temperature": 0},
    }
    reply = httpx.post(f"{url}/infer", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    (output,) = reply.json()["outputs"]
    assert output["data"] == [_greedy_reference(model_dirs["s2s"], PROMPTS[0], 6)]


def test_v2_image_classification_with_png_and_tensors(
    s2v_server: ServerProcess, model_dirs: dict[str, Path]
) -> None:
    import tritonclient.http as triton

    files = [_png(1), _png(2, (20, 70))]
    pixels, expected = _vit_reference(model_dirs["vit"], files)
    labels = [TINY_LABELS[i] for i in expected.argmax(axis=1)]
    client = triton.InferenceServerClient(s2v_server.base_url.removeprefix("http://"))
    meta = client.get_model_metadata("tiny-vit")
    assert {"name": "pixel_values", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]} in [
        {**i, "shape": [str(d) for d in i["shape"]]} for i in meta["inputs"]
    ]
    # Encoded PNG files through the binary tensor extension.
    image = triton.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
    result = client.infer("tiny-vit", [image])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    assert [v.decode() for v in result.as_numpy("label")] == labels
    # The preprocessed FP32 tensor, binary and JSON.
    for binary in (True, False):
        tensor = triton.InferInput("pixel_values", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels.astype(np.float32), binary_data=binary)
        probs = client.infer("tiny-vit", [tensor]).as_numpy("probabilities")
        np.testing.assert_allclose(probs, expected, atol=1e-5)
    # Base64 files in plain JSON.
    data = [base64.b64encode(f).decode() for f in files]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": data}]}
    reply = httpx.post(f"{s2v_server.base_url}/v2/models/tiny-vit/infer", json=body, timeout=30)
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    assert outputs["label"]["data"] == labels
    np.testing.assert_allclose(
        np.array(outputs["probabilities"]["data"]).reshape(2, -1), expected, atol=1e-5
    )


def test_v2_image_bad_inputs_are_400_and_the_worker_stays_up(s2v_server: ServerProcess) -> None:
    infer = f"{s2v_server.base_url}/v2/models/tiny-vit/infer"
    corrupt = base64.b64encode(b"\x89PNG\r\n\x1a\n not really a png").decode()
    cases = [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [corrupt]},
        {"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192},
        {"name": "pixel_values", "datatype": "INT32", "shape": [1, 3, 1, 1], "data": [1, 2, 3]},
        {"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]},
    ]
    for case in cases:
        reply = httpx.post(infer, json={"inputs": [case]}, timeout=30)
        assert reply.status_code == 400, (case["name"], reply.text)
        assert isinstance(reply.json()["error"], str)
    good = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": []}]}
    good["inputs"][0]["data"] = [base64.b64encode(_png(3)).decode()]
    reply = httpx.post(infer, json=good, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][1]["data"][0] in TINY_LABELS


def test_openai_classify_with_data_urls_on_the_image_model(
    s2v_server: ServerProcess, model_dirs: dict[str, Path]
) -> None:
    files = [_png(3), _png(4, (64, 16))]
    _, expected = _vit_reference(model_dirs["vit"], files)
    urls = [f"data:image/png;base64,{base64.b64encode(f).decode()}" for f in files]
    body = {
        "model": "tiny-vit",
        "input": [urls[0], {"type": "image_url", "image_url": {"url": urls[1]}}],
    }
    reply = httpx.post(f"{s2v_server.base_url}/v1/classify", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    np.testing.assert_allclose([d["probs"] for d in data], expected, atol=1e-5)
    assert [d["label"] for d in data] == [TINY_LABELS[i] for i in expected.argmax(axis=1)]
    # Text for an image model, and a corrupt image, are 400s; the worker stays up.
    text = httpx.post(
        f"{s2v_server.base_url}/v1/classify", json={"model": "tiny-vit", "input": "hi"}, timeout=30
    )
    assert text.status_code == 400
    corrupt = {
        "model": "tiny-vit",
        "input": "data:image/png;base64," + base64.b64encode(b"x" * 64).decode(),
    }
    assert (
        httpx.post(f"{s2v_server.base_url}/v1/classify", json=corrupt, timeout=30).status_code
        == 400
    )
    again = httpx.post(f"{s2v_server.base_url}/v1/classify", json=body, timeout=30)
    assert again.status_code == 200
