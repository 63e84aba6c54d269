"""Encoders on packed rows (lmaas.runtimes.packed) against the padded forward and
sentence-transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from runtimes_helpers import make_spec
from sentence_transformers import SentenceTransformer

from lmaas.core.errors import ModelLoadError
from lmaas.core.messages import EmbedRequest, EmbedResult, RequestError
from lmaas.runtimes.classification.sequence import EncodedRow, SequenceClassifier
from lmaas.runtimes.embedding.torch import TorchEmbeddingRunner
from lmaas.runtimes.packed import PackedEncoder, make_packing, packed_attention
from lmaas.testing.tiny_models import build_tiny_embedder
from lmaas.testing.tiny_text_heads import build_tiny_classifier

TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "A cat sat on the mat. " * 40,  # truncated at 128
    "Embeddings map sentences to vectors.",
    "ok",
    "Packed rows never pay for padding in the linear layers of the encoder.",
]


def _matrix(result: EmbedResult | RequestError) -> np.ndarray:
    assert isinstance(result, EmbedResult), result
    return np.frombuffer(result.data, dtype="<f4").reshape(result.num_inputs, result.dim)


def _embed(model_dir: Path, texts: list[str], **options: str) -> np.ndarray:
    runner = TorchEmbeddingRunner(
        make_spec(model_dir, task="embedding", max_batch_size=8, options=options)
    )
    runner.load()
    [result] = runner.embed([EmbedRequest("r", texts=texts)])
    return _matrix(result)


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_packed_rows_equal_padded_rows_and_sentence_transformers(
    tmp_path: Path, family: str
) -> None:
    model_dir = build_tiny_embedder(tmp_path / family, seed=5, family=family)
    packed = _embed(model_dir, TEXTS)
    padded = _embed(model_dir, TEXTS, packed="false")
    np.testing.assert_allclose(packed, padded, atol=2e-5, rtol=1e-4)
    expected = SentenceTransformer(str(model_dir), device="cpu").encode(
        TEXTS, convert_to_numpy=True
    )
    cosines = (packed * expected).sum(1) / (
        np.linalg.norm(packed, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosines.min() >= 1 - 1e-5


def test_the_loaded_runner_says_which_layout_it_runs(
    tiny_embedder_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="lmaas.runtimes.embedding.torch")
    _embed(tiny_embedder_dir, ["hello"])
    _embed(tiny_embedder_dir, ["hello"], packed="false")
    layouts = [r.getMessage().rsplit("(", 1)[1] for r in caplog.records if "loaded" in r.message]
    assert layouts == ["float32, packed rows)", "float32, padded rows)"]


def test_a_batch_longer_in_total_than_the_position_table(tiny_embedder_dir: Path) -> None:
    # 40 rows of ~128 tokens: ~5,000 packed tokens against a position table of 512.
    texts = ["A cat sat on the mat. " * 40] * 39 + ["short"]
    packed = _embed(tiny_embedder_dir, texts)
    padded = _embed(tiny_embedder_dir, texts, packed="false")
    np.testing.assert_allclose(packed, padded, atol=2e-5, rtol=1e-4)


def test_a_bad_packed_option_is_a_load_error(tiny_embedder_dir: Path) -> None:
    runner = TorchEmbeddingRunner(
        make_spec(tiny_embedder_dir, task="embedding", options={"packed": "maybe"})
    )
    with pytest.raises(ModelLoadError, match="packed"):
        runner.load()


def test_other_encoders_are_not_packed(tmp_path: Path) -> None:
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    assert not PackedEncoder.supports(gpt2)
    decoder = transformers.BertConfig(
        is_decoder=True, num_hidden_layers=1, hidden_size=32, num_attention_heads=2
    )
    assert not PackedEncoder.supports(transformers.BertModel(decoder))


def test_packing_places_each_token_in_its_row_and_its_attention_group() -> None:
    packing = make_packing([3, 1, 2], torch.device("cpu"), group_rows=2)
    assert packing.flat_index.tolist() == [0, 1, 2, 3, 6, 7]
    assert packing.mask().tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    rows = packing.unpack(torch.arange(6.0).unsqueeze(1))[..., 0]
    assert rows.tolist() == [[0, 1, 2], [3, 0, 0], [4, 5, 0]]
    # Rows by length: (1, 2) in one group padded to 2, (3) alone, unpadded.
    short, long = packing.groups
    assert (short.rows, short.longest, long.rows, long.longest) == (2, 2, 1, 3)
    assert short.gather.tolist() == [3, 0, 4, 5]  # row 1 (token 3, a pad), row 2 (tokens 4, 5)
    assert short.real.tolist() == [0, 2, 3] and short.tokens.tolist() == [3, 4, 5]
    assert long.gather.tolist() == [0, 1, 2] and long.tokens.tolist() == [0, 1, 2]


@pytest.mark.parametrize("group_rows", [1, 3, 64])
def test_grouped_attention_equals_one_padded_sdpa(group_rows: int) -> None:
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3, 7, 2, 9]
    heads, dim, total = 2, 4, sum(lengths)
    q, k, v = (torch.randn(1, heads, total, dim) for _ in range(3))
    packing = make_packing(lengths, torch.device("cpu"), group_rows=group_rows)
    got, _ = packed_attention(None, q, k, v, None, lmaas_packing=packing)

    def padded(x: torch.Tensor) -> torch.Tensor:
        return packing.unpack(x[0].transpose(0, 1)).transpose(1, 2)

    want = torch.nn.functional.scaled_dot_product_attention(
        padded(q), padded(k), padded(v), attn_mask=packing.key_mask
    )
    want = want.transpose(1, 2).reshape(-1, heads, dim).index_select(0, packing.flat_index)
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=1e-5)


def test_an_unpacked_call_through_the_registered_attention_is_plain_sdpa(
    tiny_embedder_dir: Path,
) -> None:
    # The attention is registered per model: a forward without a packing (e.g. another
    # library's call) must still work, padded, with its mask.
    model = transformers.AutoModel.from_pretrained(str(tiny_embedder_dir)).eval()
    reference = transformers.AutoModel.from_pretrained(str(tiny_embedder_dir)).eval()
    PackedEncoder(model)
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-4)


def _classifier_as_roberta(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    bert = transformers.AutoConfig.from_pretrained(str(source))
    config = transformers.RobertaConfig(
        vocab_size=bert.vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=bert.intermediate_size,
        pad_token_id=0,
        max_position_embeddings=bert.max_position_embeddings + 2,
        type_vocab_size=1,
        id2label=bert.id2label,
    )
    torch.manual_seed(6)
    model = transformers.RobertaForSequenceClassification(config)
    model.save_pretrained(str(dest), safe_serialization=True)
    return dest


def _logits(classifier: SequenceClassifier, rows: list[EncodedRow]) -> np.ndarray:
    return torch.stack(classifier.logits(rows)).numpy()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_classification_heads_on_packed_rows_equal_padded_rows(tmp_path: Path, family: str) -> None:
    source = build_tiny_classifier(tmp_path / "bert", seed=4)
    model_dir = source if family == "bert" else _classifier_as_roberta(source, tmp_path / family)
    runners = []
    for options in ({}, {"packed": "false"}):
        classifier = SequenceClassifier(
            make_spec(model_dir, task="classification", options=options)
        )
        classifier.load()
        runners.append(classifier)
    packed, padded = runners
    assert packed._packed is not None and padded._packed is None
    rows = packed.encode_texts(TEXTS) + packed.encode_pairs("a query", TEXTS[:4])
    if family == "bert":  # pairs carry segment ids 0 / 1
        assert any(1 in (row.token_type_ids or []) for row in rows)
    np.testing.assert_allclose(_logits(packed, rows), _logits(padded, rows), atol=2e-5, rtol=1e-4)
