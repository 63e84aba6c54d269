"""What the LLM engine core needs from the worker's torch side (owned here, H3).

``lmaas.runtimes.llm`` implements both protocols structurally; the worker process wires them.
"""

from __future__ import annotations

from typing import Protocol

from lmaas.core.messages import GenerateRequest, ModelInfo
from lmaas.runtimes.llm.batch import KVCacheLayout, Sampled, StepBatch
from lmaas.runtimes.llm.detokenize import TokenDecoder


class ModelRunner(Protocol):
    """Runs the model over a paged KV cache."""

    def load(self) -> ModelInfo:
        """Load the weights. Raises: ModelLoadError."""
        ...

    def allocate_kv_cache(
        self, budget_bytes: int | None, block_size: int, max_useful_tokens: int | None = None
    ) -> KVCacheLayout:
        """Allocate the paged cache within ``budget_bytes`` (None: the runner's default share of
        free memory, capped at ``max_useful_tokens`` tokens). Raises: ModelLoadError when not
        even one full context fits."""
        ...

    def execute(self, batch: StepBatch) -> list[Sampled]:
        """Run one step; one result per slot with ``sample=True``, in slot order."""
        ...


class PromptProcessor(Protocol):
    """Tokenizer-side work: prompts in, text out."""

    @property
    def decoder(self) -> TokenDecoder: ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        """Render the chat template / tokenize. Raises: InvalidRequestError (empty prompt, ids
        outside the vocabulary, chat request without a template, template security error)."""
        ...

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (for logprobs)."""
        ...
