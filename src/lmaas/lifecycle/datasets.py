"""Evaluation data: a JSONL file (one example per line) or a plain-text file (perplexity).

The digest stored with every result is the sha256 of the file's bytes, so two results are
comparable exactly when they were measured on the same file (and split).

Fields by task (extra fields are ignored; ``split`` selects rows with ``--split``):

* classification: ``text``, ``label`` (a label name of the model, or its index);
* image-classification: ``image`` (a path, relative to the data file), ``label``;
* embedding: ``query``, ``positive``; optional ``negatives`` (a list) join the corpus;
* rerank: ``query``, ``documents`` (texts, or ``{"id", "text"}`` objects) and ``labels`` (a
  graded relevance per document) or ``relevant`` (the relevant documents' ids or indices);
* speech-to-text: ``audio`` (a path, relative to the data file), ``reference``; optional
  ``language``;
* chat: ``messages`` (OpenAI-style) or ``prompt``, and ``reference``;
* completion, seq2seq: ``prompt`` (or ``input``), and ``reference``;
* chat/completion perplexity: ``text`` (or a ``.txt`` file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmaas.core.errors import InvalidRequestError
from lmaas.core.hashing import sha256_file

MAX_DATA_BYTES = 1 << 30
"""Evaluation files above 1 GiB are refused (they are read into memory)."""


@dataclass(slots=True, frozen=True)
class EvalData:
    """Loaded examples plus what identifies them in stored results.

    Attributes:
        path: The file.
        digest: sha256 of the whole file (hex).
        split: The split selected, empty when all rows were used.
        rows: The examples (after the split filter and the limit).
        line_numbers: 1-based line of each row, for error messages.
        is_text: True for a plain-text file (one row ``{"text": <whole file>}``).
    """

    path: Path
    digest: str
    split: str
    rows: list[dict[str, Any]]
    line_numbers: list[int]
    is_text: bool = False

    def where(self, index: int) -> str:
        """``data.jsonl line 7``: where example ``index`` came from."""
        return f"{self.path.name} line {self.line_numbers[index]}"


def load_eval_data(path: Path, split: str | None = None, limit: int | None = None) -> EvalData:
    """Read an evaluation file.

    Raises:
        InvalidRequestError: Missing, too large or malformed file; a split with no rows.
    """
    if not path.is_file():
        raise InvalidRequestError(f"evaluation data {str(path)!r} is not a file", param="data")
    if path.stat().st_size > MAX_DATA_BYTES:
        raise InvalidRequestError(f"{path.name} is larger than {MAX_DATA_BYTES} bytes")
    if limit is not None and limit < 1:
        raise InvalidRequestError("limit must be at least 1", param="limit")
    digest = sha256_file(path)
    if path.suffix == ".txt":
        if split:
            raise InvalidRequestError("a .txt file has no splits; drop --split", param="split")
        text = path.read_text(encoding="utf-8", errors="strict")
        return EvalData(path, digest, "", [{"text": text}], [1], is_text=True)
    rows, lines = _read_jsonl(path)
    if split:
        kept = [(r, n) for r, n in zip(rows, lines, strict=True) if r.get("split") == split]
        if not kept:
            raise InvalidRequestError(f"no row of {path.name} has split {split!r}", param="split")
        rows, lines = [r for r, _ in kept], [n for _, n in kept]
    if not rows:
        raise InvalidRequestError(f"{path.name} holds no examples", param="data")
    if limit is not None:
        rows, lines = rows[:limit], lines[:limit]
    return EvalData(path, digest, split or "", rows, lines)


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"{path.name} line {number}: not JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise InvalidRequestError(f"{path.name} line {number}: not a JSON object")
            rows.append(row)
            lines.append(number)
    return rows, lines


def field_of(data: EvalData, index: int, *names: str, kind: type = str) -> Any:
    """The first of ``names`` present in example ``index``, checked to be a ``kind``.

    Raises:
        InvalidRequestError: None of the fields is there, or it has the wrong type.
    """
    row = data.rows[index]
    for name in names:
        if name in row:
            value = row[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InvalidRequestError(
                    f"{data.where(index)}: {name!r} must be a {kind.__name__}"
                )
            return value
    wanted = " or ".join(repr(name) for name in names)
    raise InvalidRequestError(f"{data.where(index)}: missing field {wanted}")
