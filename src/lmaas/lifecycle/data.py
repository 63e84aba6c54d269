"""Labelled data sets for training and for measuring transformed versions (no torch here).

Images come from a folder (``DIR/<label>/*.png``) or from scikit-learn's ``load_digits`` (1,797
real 8x8 greyscale scans of handwritten digits, shipped inside scikit-learn: no download). Texts
come from JSONL (``{"text": ..., "label": ...}`` per line) or CSV (``text,label`` header).

Splits are deterministic (a seeded shuffle), so a compression or conversion of a trained version
measures its accuracy on exactly the held-out images the training run reported.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmaas.core.errors import InvalidRequestError

DIGITS_SOURCE = "sklearn-digits"
"""The ``data`` parameter recorded for scikit-learn's digits."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


@dataclass(frozen=True, slots=True)
class LabelledImages:
    """Images (Pillow, any mode) with integer labels indexing ``label_names``."""

    images: list[Any]
    labels: list[int]
    label_names: list[str]
    source: str


@dataclass(frozen=True, slots=True)
class LabelledTexts:
    """Texts with integer labels indexing ``label_names``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str


@dataclass(frozen=True, slots=True)
class Split:
    """Indices of the train, validation (early stopping) and test (held-out) parts."""

    train: list[int]
    val: list[int]
    test: list[int]


def load_digits_images() -> LabelledImages:
    """scikit-learn's digits as greyscale Pillow images (values 0-16 scaled to 0-255)."""
    from PIL import Image
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    images = [
        Image.fromarray((img * (255.0 / 16.0)).round().astype("uint8"), mode="L")
        for img in digits.images
    ]
    labels = [int(t) for t in digits.target]
    return LabelledImages(images, labels, [str(i) for i in range(10)], DIGITS_SOURCE)


def load_image_folder(root: Path) -> LabelledImages:
    """Images under ``root/<label>/``; labels sorted by name.

    Raises:
        InvalidRequestError: not a directory, fewer than two labels, or an unreadable image.
    """
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise InvalidRequestError(f"{root} is not a directory of DIR/<label>/*.png", param="data")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    images: list[Any] = []
    labels: list[int] = []
    for index, name in enumerate(names):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
            except (OSError, UnidentifiedImageError) as exc:
                raise InvalidRequestError(f"cannot read image {path}: {exc}", param="data") from exc
            labels.append(index)
    if len(set(labels)) < 2:
        raise InvalidRequestError(
            f"{root} needs images in at least two label folders (DIR/<label>/*.png)", param="data"
        )
    return LabelledImages(images, labels, names, str(root.resolve()))


def load_texts(path: Path) -> LabelledTexts:
    """Labelled texts from ``.jsonl`` (``text`` and ``label`` keys) or ``.csv`` (same columns).

    Raises:
        InvalidRequestError: unknown suffix, a row without text or label, or fewer than 2 labels.
    """
    rows: list[tuple[str, str]] = []
    try:
        if path.suffix.lower() == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                for number, line in enumerate(fh, 1):
                    if line.strip():
                        rows.append(_text_row(json.loads(line), f"{path.name}:{number}"))
        elif path.suffix.lower() == ".csv":
            with path.open(encoding="utf-8", newline="") as fh:
                for number, record in enumerate(csv.DictReader(fh), 2):
                    rows.append(_text_row(record, f"{path.name}:{number}"))
        else:
            raise InvalidRequestError(f"{path.name}: expected a .jsonl or .csv file", param="data")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc}", param="data") from exc
    names = sorted({label for _, label in rows})
    if len(names) < 2:
        raise InvalidRequestError(f"{path.name} needs at least two distinct labels", param="data")
    index = {name: i for i, name in enumerate(names)}
    return LabelledTexts(
        [text for text, _ in rows], [index[label] for _, label in rows], names, str(path.resolve())
    )


CHAT_ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True, slots=True)
class Chats:
    """Conversations (``[{"role": ..., "content": ...}, ...]``), each with an assistant turn."""

    conversations: list[list[dict[str, str]]]
    source: str


def load_chats(path: Path) -> Chats:
    """Chat-formatted JSONL: one ``{"messages": [{"role": ..., "content": ...}, ...]}`` a line.

    Roles are ``system``, ``user`` and ``assistant``; every conversation needs at least one
    assistant message (the text the fine-tune learns to produce).

    Raises:
        InvalidRequestError: not ``.jsonl``, unreadable, or a line that is not such an object
            (the message names the line).
    """
    if path.suffix.lower() != ".jsonl":
        raise InvalidRequestError(f"{path.name}: expected a .jsonl file of chats", param="data")
    conversations = []
    try:
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    conversations.append(_chat_row(json.loads(line), f"{path.name}:{number}"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc}", param="data") from exc
    if not conversations:
        raise InvalidRequestError(f"{path.name} holds no conversations", param="data")
    return Chats(conversations, str(path.resolve()))


def _chat_row(record: object, where: str) -> list[dict[str, str]]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(f'{where}: expected {{"messages": [...]}}', param="data")
    out = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise InvalidRequestError(
                f"{where}: messages[{index}] needs a role (system, user or assistant) and a "
                "string content",
                param="data",
            )
        out.append({"role": str(role), "content": content})
    if not any(m["role"] == "assistant" and m["content"] for m in out):
        raise InvalidRequestError(f"{where}: the conversation has no assistant message to learn")
    return out


def chats_digest(data: Chats, indices: Sequence[int]) -> str:
    """sha256 of the chosen conversations."""
    digest = hashlib.sha256()
    for i in indices:
        digest.update(json.dumps(data.conversations[i], sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def _text_row(record: object, where: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise InvalidRequestError(f"{where}: expected an object with 'text' and 'label'")
    text, label = record.get("text"), record.get("label")
    if not isinstance(text, str) or not text or label is None or str(label) == "":
        raise InvalidRequestError(f"{where}: needs a non-empty 'text' and a 'label'", param="data")
    return text, str(label)


def split(count: int, *, test_fraction: float, val_fraction: float, seed: int) -> Split:
    """Shuffle ``range(count)`` with ``seed`` and cut test, then validation, off the front.

    Raises:
        InvalidRequestError: fractions outside [0, 1) or leaving no training rows.
    """
    for name, value in (("test_split", test_fraction), ("val_split", val_fraction)):
        if not 0.0 <= value < 1.0:
            raise InvalidRequestError(f"{name} must be in [0, 1), got {value}", param=name)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    num_test = round(count * test_fraction)
    num_val = round(count * val_fraction)
    if count - num_test - num_val < 1 or (test_fraction > 0 and num_test == 0):
        raise InvalidRequestError(
            f"{count} examples are too few for test_split={test_fraction} and "
            f"val_split={val_fraction}",
            param="data",
        )
    return Split(
        train=order[num_test + num_val :],
        val=order[num_test : num_test + num_val],
        test=order[:num_test],
    )


def k_folds(
    indices: Sequence[int], k: int, *, val_fraction: float
) -> list[tuple[list[int], list[int], list[int]]]:
    """``k`` folds of ``indices`` (already shuffled): ``(train, val, held_out)`` per fold.

    Fold ``i`` holds out every ``k``-th index starting at ``i`` (sizes differ by at most one);
    the other folds are cut into validation (the first ``val_fraction`` of them, at least one,
    for early stopping) and training.

    Raises:
        InvalidRequestError: ``k`` < 2, or too few indices for ``k`` folds with a validation
            and a training row each.
    """
    if k < 2:
        raise InvalidRequestError(f"k-fold cross-validation needs k >= 2, got {k}", param="k_fold")
    if len(indices) < 3 * k:
        raise InvalidRequestError(
            f"{len(indices)} examples (after the test split) are too few for {k} folds",
            param="k_fold",
        )
    folds = []
    for fold in range(k):
        held_out = list(indices[fold::k])
        rest = [index for n, index in enumerate(indices) if n % k != fold]
        num_val = max(1, round(len(rest) * val_fraction))
        folds.append((rest[num_val:], rest[:num_val], held_out))
    return folds


def images_digest(data: LabelledImages, indices: Sequence[int]) -> str:
    """sha256 of the chosen images' pixels and labels (the metric's ``dataset_digest``)."""
    digest = hashlib.sha256()
    for i in indices:
        img = data.images[i]
        digest.update(f"{data.labels[i]}:{img.mode}:{img.size}".encode())
        digest.update(img.tobytes())
    return digest.hexdigest()


def texts_digest(data: LabelledTexts, indices: Sequence[int]) -> str:
    """sha256 of the chosen texts and labels."""
    digest = hashlib.sha256()
    for i in indices:
        digest.update(f"{data.label_names[data.labels[i]]}\t{data.texts[i]}\n".encode())
    return digest.hexdigest()
