"""Tiny random-weight BERT models with a sequence-classification head, in HF layout.

Two shapes, both with the WordPiece tokenizer of :mod:`lmaas.testing.tiny_models`:

* a cross-encoder (``num_labels=1``) in the layout of the sentence-transformers ``CrossEncoder``
  models on the hub (``config.json`` names the activation under ``sentence_transformers``), which
  the registry imports as a ``rerank`` model;
* a text classifier (``num_labels=3`` with ``id2label`` names), imported as ``classification``.

The weights are random: scores and labels are meaningless, only their computation is real.

Command line::

    python -m lmaas.testing.tiny_text_heads DEST --kind reranker|classifier
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmaas.testing.tiny_models import _build_wordpiece_tokenizer

CLASSIFIER_LABELS = ("negative", "neutral", "positive")
"""The ``id2label`` names of :func:`build_tiny_classifier`, in class order."""

SIGMOID_PATH = "torch.nn.modules.activation.Sigmoid"
"""How sentence-transformers names a cross-encoder's default activation in ``config.json``."""


def _build_bert_classifier(
    dest: Path,
    *,
    seed: int,
    labels: tuple[str, ...],
    hidden_size: int,
    num_layers: int,
    max_length: int,
) -> Path:
    import transformers

    _build_wordpiece_tokenizer(dest)
    tokenizer_config_path = dest / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text(encoding="utf-8"))
    tokenizer_config["model_max_length"] = max_length
    _write_json(tokenizer_config_path, tokenizer_config)
    vocab_size = Tokenizer.from_file(str(dest / "tokenizer.json")).get_vocab_size()
    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, intermediate_size=hidden_size * 2,
        max_position_embeddings=512, pad_token_id=0,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config)
    # The default init leaves the head near zero: widen it so probabilities differ visibly.
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(dest), safe_serialization=True)
    return dest


def build_tiny_cross_encoder(
    dest: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_length: int = 128,
) -> Path:
    """Write a random-weight BERT cross-encoder (one output logit) into ``dest``.

    The layout is what ``CrossEncoder.save`` writes: ``config.json`` names the activation under
    ``"sentence_transformers"`` (as the hub's ``cross-encoder/ms-marco-*`` models do), and
    ``modules.json`` / ``config_sentence_transformers.json`` (``model_type: CrossEncoder``) sit
    next to it, so ``sentence_transformers.CrossEncoder`` loads the directory and scores with a
    sigmoid.

    Args:
        dest: Target directory (created).
        seed: Seeds the weight initialisation.
        hidden_size, num_layers: Model shape.
        max_length: The tokenizer's ``model_max_length``: longer pairs are truncated.

    Returns:
        ``dest``.
    """
    _build_bert_classifier(
        dest, seed=seed, labels=("LABEL_0",), hidden_size=hidden_size,
        num_layers=num_layers, max_length=max_length,
    )  # fmt: skip
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["sentence_transformers"] = {"activation_fn": SIGMOID_PATH}
    _write_json(config_path, config)
    _cross_encoder_files(dest)
    return dest


def _cross_encoder_files(dest: Path) -> None:
    """The files ``CrossEncoder.save`` (sentence-transformers 5+) writes next to the HF ones."""
    module = "sentence_transformers.base.modules.transformer.Transformer"
    _write_json(dest / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": module}])
    _write_json(
        dest / "sentence_bert_config.json",
        {
            "transformer_task": "sequence-classification",
            "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
            "module_output_name": "scores",
        },
    )
    _write_json(
        dest / "config_sentence_transformers.json",
        {
            "model_type": "CrossEncoder",
            "activation_fn": SIGMOID_PATH,
            "default_prompt_name": None,
            "prompts": {},
        },
    )


def build_tiny_classifier(
    dest: Path,
    *,
    seed: int = 0,
    labels: tuple[str, ...] = CLASSIFIER_LABELS,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_length: int = 128,
) -> Path:
    """Write a random-weight BERT sequence classifier with named labels into ``dest``.

    Args:
        dest: Target directory (created).
        seed: Seeds the weight initialisation.
        labels: Class names (``id2label``), at least two.
        hidden_size, num_layers: Model shape.
        max_length: The tokenizer's ``model_max_length``: longer texts are truncated.

    Returns:
        ``dest``.

    Raises:
        ValueError: fewer than two labels.
    """
    if len(labels) < 2:
        raise ValueError("a classifier needs at least two labels")
    return _build_bert_classifier(
        dest, seed=seed, labels=labels, hidden_size=hidden_size,
        num_layers=num_layers, max_length=max_length,
    )  # fmt: skip


def write_labelled_texts(path: Path, per_label: int, *, seed: int = 0) -> Path:
    """Write a JSONL of short random texts, ``per_label`` rows for each of
    :data:`CLASSIFIER_LABELS` (``{"text": ..., "label": ...}``), the data the lifecycle tests
    train and evaluate the tiny classifier on. Returns ``path``."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "park", "good", "bad", "film"]
    rows = [
        {"text": " ".join(rng.choices(words, k=rng.randint(3, 12))), "label": label}
        for label in CLASSIFIER_LABELS
        for _ in range(per_label)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Build a demo model: ``DEST --kind reranker|classifier [--seed 0]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lmaas.testing.tiny_text_heads",
        description="Build a tiny BERT reranker or classifier with RANDOM weights (for tests and "
        "demos; its scores and labels mean nothing).",
    )
    parser.add_argument("dest", type=Path, help="directory to write the model into")
    parser.add_argument("--kind", choices=("reranker", "classifier"), default="reranker")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "reranker":
        build_tiny_cross_encoder(args.dest, seed=args.seed)
    else:
        build_tiny_classifier(args.dest, seed=args.seed)
    print(args.dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
