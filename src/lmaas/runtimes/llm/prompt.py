"""Turning a GenerateRequest into prompt token ids, and the context-length budget."""

from __future__ import annotations

import logging
from typing import Protocol

from lmaas.core.errors import InvalidRequestError, ModelLoadError
from lmaas.core.messages import GenerateRequest
from lmaas.runtimes.llm.chat_template import ChatTemplate

_log = logging.getLogger("lmaas.runtimes.llm")


class TokenEncoder(Protocol):
    """The part of a Hugging Face tokenizer prompt building needs."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def refuse_beam_search(request: GenerateRequest) -> None:
    """Beam search is served for seq2seq models only: a causal LM refuses it, never ignores it.

    Raises:
        InvalidRequestError: ``num_beams > 1`` or a ``length_penalty``.
    """
    params = request.sampling
    for name, is_set in (
        ("num_beams", params.num_beams not in (None, 1)),
        ("length_penalty", params.length_penalty is not None),
    ):
        if is_set:
            raise InvalidRequestError(
                f"'{name}' (beam search) is supported for seq2seq models only", param=name
            )


def prompt_param(request: GenerateRequest) -> str:
    """The request field that holds the prompt, for error reports."""
    if request.messages is not None:
        return "messages"
    return "prompt"


def build_prompt_ids(
    request: GenerateRequest,
    tokenizer: TokenEncoder,
    template: ChatTemplate | None,
    vocab_size: int,
) -> list[int]:
    """Tokenize the request's prompt (messages, prompt string, or given ids).

    Raises:
        InvalidRequestError: no or several prompt fields, an empty prompt, ids outside the
            vocabulary, a chat request to a model without a template.
    """
    given = [
        f for f in (request.messages, request.prompt, request.prompt_token_ids) if f is not None
    ]
    if len(given) != 1:
        raise InvalidRequestError(
            "exactly one of messages, prompt or prompt_token_ids must be given", param="prompt"
        )
    if request.messages is not None:
        if template is None:
            raise InvalidRequestError(
                "model has no chat template; use /v1/completions", param="messages"
            )
        if not request.messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        text = template.render(
            request.messages, add_generation_prompt=request.add_generation_prompt
        )
        # The template already wrote whatever special tokens the model expects.
        ids = tokenizer.encode(text, add_special_tokens=False)
    elif request.prompt is not None:
        ids = tokenizer.encode(request.prompt, add_special_tokens=True) if request.prompt else []
    else:
        ids = _checked_ids(request.prompt_token_ids or [], vocab_size)
    if not ids:
        raise InvalidRequestError("the prompt is empty", param=prompt_param(request))
    return ids


def _checked_ids(token_ids: list[int], vocab_size: int) -> list[int]:
    bad = [i for i in token_ids if not 0 <= i < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
            param="prompt",
        )
    return list(token_ids)


def resolve_max_tokens(
    request: GenerateRequest, num_prompt_tokens: int, context_length: int
) -> int:
    """The number of tokens the request may generate; None means up to the end of the context.

    Raises:
        InvalidRequestError: prompt plus max_tokens exceed the context, quoting the numbers.
    """
    max_tokens = request.sampling.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError(
            f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens"
        )
    if num_prompt_tokens >= context_length:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_length} tokens, but the prompt "
            f"has {num_prompt_tokens} tokens, which leaves no room for a completion. Please "
            "shorten the prompt.",
            param=prompt_param(request),
        )
    if max_tokens is None:
        return context_length - num_prompt_tokens
    if num_prompt_tokens + max_tokens > context_length:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} for the completion). Please reduce the length of the "
            "prompt or max_tokens.",
            param="max_tokens",
        )
    return max_tokens


def resolve_context_length(native: int, requested: int | None) -> int:
    """The context to serve: the requested one, never past the model's own (0: unknown).

    Raises:
        ModelLoadError: neither the model config nor the serving options give a length.
    """
    if not native and requested is None:
        raise ModelLoadError("the model config names no context length; set context_length")
    if requested is None:
        return native
    if native and requested > native:
        _log.warning(
            "context_length %d exceeds the model's %d; using %d", requested, native, native
        )
        return native
    return requested
