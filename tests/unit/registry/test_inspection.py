from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lmaas.core.errors import InvalidRequestError
from lmaas.core.types import Task
from lmaas.registry.inspection import inspect_model_dir

MakeModelDir = Callable[..., Path]

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize(
    ("arch", "config", "tokenizer_config", "expected"),
    [
        ("BertModel", {"model_type": "bert"}, {}, Task.EMBEDDING),
        ("XLMRobertaModel", {"model_type": "xlm-roberta"}, {}, Task.EMBEDDING),
        ("LlamaForCausalLM", {}, {"chat_template": CHAT_TEMPLATE}, Task.CHAT),
        ("LlamaForCausalLM", {}, {}, Task.COMPLETION),
        ("GPT2LMHeadModel", {"model_type": "gpt2"}, {}, Task.COMPLETION),
        (
            "BertForSequenceClassification",
            {"id2label": {"0": "neg", "1": "pos"}},
            {},
            Task.CLASSIFICATION,
        ),
        ("BertForSequenceClassification", {"id2label": {"0": "LABEL_0"}}, {}, Task.RERANK),
        ("T5ForConditionalGeneration", {"model_type": "t5"}, {}, Task.SEQ2SEQ),
        ("BartForConditionalGeneration", {"model_type": "bart"}, {}, Task.SEQ2SEQ),
        ("MarianMTModel", {"model_type": "marian"}, {}, Task.SEQ2SEQ),
        ("T5EncoderModel", {"model_type": "t5"}, {}, Task.EMBEDDING),
        ("FooForConditionalGeneration", {"is_encoder_decoder": True}, {}, Task.SEQ2SEQ),
        ("WhisperForConditionalGeneration", {"model_type": "whisper"}, {}, Task.SPEECH_TO_TEXT),
        ("ViTForImageClassification", {"id2label": {"0": "cat"}}, {}, Task.IMAGE_CLASSIFICATION),
    ],
)
def test_task_inference(
    make_model_dir: MakeModelDir,
    arch: str,
    config: dict[str, Any],
    tokenizer_config: dict[str, Any],
    expected: Task,
) -> None:
    path = make_model_dir(architectures=[arch], config=config, tokenizer_config=tokenizer_config)
    assert inspect_model_dir(path).task is expected


def test_chat_template_file_makes_a_chat_model(make_model_dir: MakeModelDir) -> None:
    path = make_model_dir(extra_files={"chat_template.jinja": CHAT_TEMPLATE.encode()})
    assert inspect_model_dir(path).task is Task.CHAT


def test_sentence_transformers_layout(make_model_dir: MakeModelDir) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
    ]
    path = make_model_dir(
        architectures=["BertForMaskedLM"],
        config={"max_position_embeddings": 512},
        extra_files={
            "modules.json": json.dumps(modules).encode(),
            "sentence_bert_config.json": json.dumps({"max_seq_length": 256}).encode(),
            "1_Pooling/config.json": b"{}",
        },
    )
    facts = inspect_model_dir(path)
    assert facts.task is Task.EMBEDDING
    assert facts.context_length == 256  # the smaller of the two


@pytest.mark.parametrize("arch", ["LlavaForConditionalGeneration", "BertForTokenClassification"])
def test_unknown_shape_asks_for_task(make_model_dir: MakeModelDir, arch: str) -> None:
    path = make_model_dir(architectures=[arch], config={"model_type": "x"})
    with pytest.raises(InvalidRequestError, match="--task"):
        inspect_model_dir(path)
    assert inspect_model_dir(path, Task.CHAT).task is Task.CHAT


def test_config_facts(make_model_dir: MakeModelDir) -> None:
    path = make_model_dir(
        architectures=["BertForSequenceClassification"],
        config={
            "torch_dtype": None,
            "dtype": "bfloat16",
            "max_position_embeddings": None,
            "n_positions": 1024,
            "id2label": {"1": "pos", "0": "neg", "2": "neutral"},
        },
    )
    facts = inspect_model_dir(path)
    assert facts.architecture == "BertForSequenceClassification"
    assert facts.context_length == 1024
    assert facts.labels == ["neg", "pos", "neutral"]


def test_dtype_key_of_newer_transformers(tmp_path: Path) -> None:
    tmp_path.joinpath("config.json").write_text(
        json.dumps({"architectures": ["BertModel"], "dtype": "float16"})
    )
    assert inspect_model_dir(tmp_path).dtype == "float16"


def test_unreadable_config(tmp_path: Path) -> None:
    tmp_path.joinpath("config.json").write_text("{not json")
    with pytest.raises(InvalidRequestError, match=r"config\.json"):
        inspect_model_dir(tmp_path)
