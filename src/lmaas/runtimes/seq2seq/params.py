"""A seq2seq request's input and decoding parameters, checked and resolved for the checkpoint.

Everything a request may not ask of this runtime is refused here with a 400 naming the
parameter; every decoding parameter it leaves out takes the checkpoint's ``generation_config``
default.
"""

from __future__ import annotations

from typing import Any

from lmaas.core.errors import InvalidRequestError, ModelLoadError
from lmaas.core.messages import MAX_NUM_BEAMS, GenerateRequest, SamplingParams, WorkerSpec
from lmaas.runtimes.seq2seq.beam import BeamSettings
from lmaas.runtimes.seq2seq.decoding import DecodingRules

_UNSET_LIMIT = 1_000_000
"""Tokenizers without a maximum length report a huge ``model_max_length``."""


def encoder_input_ids(
    request: GenerateRequest, tokenizer: Any, vocab_size: int, max_input_tokens: int
) -> list[int]:
    """The encoder input of ``request``: its prompt tokenised, or its token ids, checked."""
    if request.messages is not None:
        raise InvalidRequestError(
            "seq2seq models take a prompt, not chat messages; use /v1/completions",
            param="messages",
        )
    if request.prompt_token_ids is not None:
        ids = list(request.prompt_token_ids)
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                param="prompt",
            )
    elif request.prompt:
        ids = tokenizer.encode(request.prompt, add_special_tokens=True)
    else:
        ids = []
    if not ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if len(ids) > max_input_tokens:
        raise InvalidRequestError(
            f"This model's maximum input length is {max_input_tokens} tokens, but the "
            f"prompt has {len(ids)} tokens. Please shorten the prompt.",
            param="prompt",
        )
    return list(ids)


def check_sampling(params: SamplingParams) -> None:
    """Refuse the sampling features this runner does not implement, naming the parameter."""
    unsupported = {
        "logprobs": params.logprobs is not None,
        "response_format": params.response_format is not None,
        "logit_bias": bool(params.logit_bias),
        "presence_penalty": params.presence_penalty != 0.0,
        "frequency_penalty": params.frequency_penalty != 0.0,
        "repetition_penalty": params.repetition_penalty != 1.0,
        "min_p": params.min_p > 0.0,
    }
    for name, is_set in unsupported.items():
        if is_set:
            raise InvalidRequestError(f"'{name}' is not supported for seq2seq models", param=name)


def resolve_max_tokens(params: SamplingParams, rules: DecodingRules, limit: int) -> int:
    """The request's output length: its ``max_tokens``, else the checkpoint's, within the
    decoder's ``limit``. Raises: InvalidRequestError."""
    if params.max_tokens is None:
        return min(limit, rules.max_new_tokens or limit)
    if not 1 <= params.max_tokens <= limit:
        raise InvalidRequestError(
            f"max_tokens must lie in 1..{limit} for this model, got {params.max_tokens}",
            param="max_tokens",
        )
    return params.max_tokens


def resolve_beams(
    params: SamplingParams, rules: DecodingRules, max_tokens: int
) -> BeamSettings | None:
    """The request's beam search, or None to decode one sequence (greedy or sampled).

    A request that names no ``num_beams`` and does not sample gets the checkpoint's; ``n > 1``
    returns the n best beams, so it needs ``num_beams >= n``.

    Raises:
        InvalidRequestError: ``num_beams`` out of range, beam search with sampling, or ``n``
            more than the beams.
    """
    num_beams = params.num_beams
    if num_beams is not None and not 1 <= num_beams <= MAX_NUM_BEAMS:
        raise InvalidRequestError(
            f"num_beams must lie in 1..{MAX_NUM_BEAMS}, got {num_beams}", param="num_beams"
        )
    samples = params.temperature > 0.0
    if num_beams is None:
        num_beams = 1 if samples else rules.num_beams
    if num_beams > 1 and samples:
        raise InvalidRequestError(
            f"beam search (num_beams={num_beams}) does not sample: leave temperature out or set "
            "it to 0, or set num_beams to 1 to sample",
            param="temperature",
        )
    if params.n > num_beams:
        raise InvalidRequestError(
            f"n={params.n} returns the n best beams of beam search and needs num_beams >= n "
            f"(num_beams is {num_beams})",
            param="n",
        )
    if num_beams == 1:
        return None
    stop_ids = frozenset(params.stop_token_ids) | (
        frozenset() if params.ignore_eos else rules.eos_ids
    )
    return BeamSettings(
        num_beams=num_beams,
        num_return=max(1, params.n),
        length_penalty=(
            rules.length_penalty if params.length_penalty is None else params.length_penalty
        ),
        early_stopping=rules.early_stopping,
        max_tokens=max_tokens,
        stop_ids=stop_ids,
    )


def max_input_tokens(config: Any, tokenizer: Any, spec: WorkerSpec) -> int:
    """The encoder's input limit: the model's positions, the tokenizer's maximum and the
    served ``context_length``, whichever is smallest (T5 has relative positions: no model
    limit of its own)."""
    limits = [
        int(getattr(config, "max_position_embeddings", 0) or 0),
        int(getattr(config, "n_positions", 0) or 0),
        int(getattr(tokenizer, "model_max_length", 0) or 0),
        spec.context_length or 0,
    ]
    positive = [limit for limit in limits if 0 < limit < _UNSET_LIMIT]
    if not positive:
        raise ModelLoadError(
            "cannot tell the encoder's maximum input length; set the context_length option"
        )
    return min(positive)
