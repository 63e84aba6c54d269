"""A tiny random-weight image classifier (ViT shape) in Hugging Face layout, for tests and demos.

The directory holds ``config.json`` (``ViTForImageClassification``, ``id2label``),
``model.safetensors`` and ``preprocessor_config.json`` (a ``ViTImageProcessor``: resize to a
small square, rescale, normalise), which is what a real ``google/vit-*`` checkpoint ships. The
weights are random: predictions are meaningless, and so is any accuracy measured on them.

Command line::

    python -m lmaas.testing.tiny_vision DEST
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TINY_LABELS = ("cat", "dog", "bird", "fish", "horse")
"""Class labels of the tiny classifier, in output order."""


def build_tiny_image_classifier(
    dest: Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    labels: tuple[str, ...] = TINY_LABELS,
) -> Path:
    """Write a random-weight ViT image classifier with its image processor into ``dest``.

    Args:
        dest: Target directory (created).
        seed: Seeds the weight initialisation; the same seed gives the same weights.
        image_size: Height and width the processor resizes to (a multiple of 8).
        labels: Class names (``id2label``).

    Returns:
        ``dest``.
    """
    import transformers

    dest.mkdir(parents=True, exist_ok=True)
    config = transformers.ViTConfig(
        image_size=image_size, patch_size=8, num_channels=3, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
        architectures=["ViTForImageClassification"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(config)
    model.save_pretrained(str(dest), safe_serialization=True)
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    text = json.dumps(processor, indent=2) + "\n"
    (dest / "preprocessor_config.json").write_text(text, encoding="utf-8")
    return dest


def main(argv: list[str] | None = None) -> int:
    """Build the tiny classifier: ``DEST [--seed 0]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lmaas.testing.tiny_vision",
        description="Build a tiny image classifier with RANDOM weights (tests and demos only).",
    )
    parser.add_argument("dest", type=Path, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_tiny_image_classifier(args.dest, seed=args.seed)
    print(args.dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
