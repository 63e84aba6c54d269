"""The tokenizer side of the LLM engine for Hugging Face checkpoints (a ``PromptProcessor``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmaas.core.errors import ModelLoadError
from lmaas.core.messages import GenerateRequest, WorkerSpec
from lmaas.runtimes.llm.chat_template import ChatTemplate
from lmaas.runtimes.llm.detokenize import TokenDecoder
from lmaas.runtimes.llm.prompt import build_prompt_ids


class HFPromptProcessor:
    """Chat template (sandboxed), tokenization and token texts from the model's own files.

    Args:
        spec: The worker spec (model directory, trust_remote_code option).
        vocab_size: The model's vocabulary size; prompt ids outside it are refused.
    """

    def __init__(self, spec: WorkerSpec, vocab_size: int) -> None:
        from transformers import AutoTokenizer

        model_dir = Path(spec.model_dir)
        trust = spec.options.get("trust_remote_code") == "true"
        try:
            self._tokenizer: Any = AutoTokenizer.from_pretrained(
                str(model_dir), local_files_only=True, trust_remote_code=trust
            )
        except Exception as exc:  # transformers raises OSError, ValueError, ...
            raise ModelLoadError(f"cannot load the tokenizer of {model_dir}: {exc}") from exc
        # 0: the model did not say; the tokenizer's own size is the best bound then.
        self._vocab_size = vocab_size or len(self._tokenizer)
        self._template = chat_template_of(self._tokenizer)
        self._eos_ids = eos_token_ids_of(model_dir, self._tokenizer)

    @property
    def decoder(self) -> TokenDecoder:
        decoder: TokenDecoder = self._tokenizer
        return decoder

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def tokenizer(self) -> Any:
        """The underlying Hugging Face tokenizer (for grammar compilation)."""
        return self._tokenizer

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        return build_prompt_ids(request, self._tokenizer, self._template, self._vocab_size)

    def token_text(self, token_id: int) -> str:
        text: str = self._tokenizer.decode([token_id])
        return text


def eos_token_ids_of(model_dir: Path, tokenizer: Any) -> frozenset[int]:
    """Every id that ends generation: the tokenizer's, generation_config's and config's."""
    found: set[int] = set()
    values: list[object] = [getattr(tokenizer, "eos_token_id", None)]
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            values.append(json.loads(path.read_text()).get("eos_token_id"))
    for value in values:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(v for v in value if isinstance(v, int))
    return frozenset(found)


def chat_template_of(tokenizer: Any) -> ChatTemplate | None:
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):
        source = source.get("default")
    if not isinstance(source, str) or not source:
        return None
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    special = {name: str(getattr(tokenizer, name, None) or "") for name in names}
    return ChatTemplate(source, special)
