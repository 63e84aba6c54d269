"""The decoding parameters chat and completions share, and their mapping to SamplingParams."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field

from lmaas.api.openai.base import (
    MAX_NUM_STOP,
    MAX_STOP_CHARS,
    MAX_TOKEN_ID,
    MAX_TOKENS_LIMIT,
    OpenAIBaseModel,
    check_text,
    reject_set,
)
from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import MAX_NUM_BEAMS, SamplingParams
from lmaas.core.types import Task
from lmaas.engine.protocol import ServedModel

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
MAX_N = 16
MAX_LOGIT_BIAS_ENTRIES = 1024
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


class StreamOptions(OpenAIBaseModel):
    """``stream_options``: only ``include_usage`` is honoured."""

    include_usage: bool = False


class SamplingFields(OpenAIBaseModel):
    """Fields common to ``/v1/chat/completions`` and ``/v1/completions``."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOKENS_LIMIT)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_NUM_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_LIMIT)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    """vLLM extra: HF-style penalty over prompt and output (1 disables)."""
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    response_format: dict[str, Any] | None = None
    num_beams: int | None = Field(default=None, ge=1, le=MAX_NUM_BEAMS)
    """lmaas extra, seq2seq models only: beam search width (1: none); None: the checkpoint's
    ``generation_config`` for a request that does not sample."""
    length_penalty: float | None = Field(default=None, ge=-10.0, le=10.0)
    """lmaas extra, seq2seq beam search only: a hypothesis scores ``logprob / length **
    length_penalty``; None: the checkpoint's."""
    user: str | None = None
    chat_template: Any = None
    """Never honoured: a template from a request could run arbitrary Jinja."""

    def common_rejections(self) -> dict[str, bool]:
        return {"chat_template": self.chat_template is not None}

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def to_sampling(
        self, model: ServedModel, max_tokens: int | None, logprobs: int | None = None
    ) -> SamplingParams:
        """Validated :class:`SamplingParams`; temperature 0 means greedy (or beam search).

        ``temperature`` defaults to 1, and to 0 for seq2seq models: a translation or summary
        decodes as the checkpoint's ``generate()`` does unless the request asks to sample.

        Args:
            logprobs: None for none, 0 for the sampled token's only, k for the top k too.

        Raises:
            InvalidRequestError: an unsupported parameter, or values that contradict.
        """
        reject_set(self.common_rejections())
        self._check_lengths(model, max_tokens)
        seq2seq = model.task is Task.SEQ2SEQ
        if not seq2seq:
            self._reject_beams(model)
        default_temperature = 0.0 if seq2seq else 1.0
        temperature = default_temperature if self.temperature is None else self.temperature
        greedy = temperature == 0.0
        top_k = self.top_k if self.top_k is not None and self.top_k > 0 else 0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if greedy or self.top_p is None else self.top_p,
            top_k=1 if greedy else top_k,
            seed=self.seed,
            stop=_stop_list(self.stop),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            min_p=0.0 if greedy or self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=_logit_bias(self.logit_bias),
            logprobs=logprobs,
            n=self.n or 1,
            response_format=response_format_json(self.response_format),
            num_beams=self.num_beams,
            length_penalty=self.length_penalty,
        )

    def _reject_beams(self, model: ServedModel) -> None:
        beams = {
            "num_beams": self.num_beams not in (None, 1),
            "length_penalty": self.length_penalty is not None,
        }
        for name, is_set in beams.items():
            if is_set:
                raise InvalidRequestError(
                    f"'{name}' (beam search) is supported for seq2seq models only; "
                    f"'{model.name}' is a {model.task.value} model",
                    param=name,
                )

    def _check_lengths(self, model: ServedModel, max_tokens: int | None) -> None:
        context = model.info.context_length if model.info else None
        if max_tokens is not None and context is not None and max_tokens > context:
            raise InvalidRequestError(
                f"max_tokens ({max_tokens}) is larger than the model's context length ({context})",
                param="max_tokens",
            )
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) is larger than max_tokens ({max_tokens})",
                param="min_tokens",
            )


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    """Token-id keys (as strings on the wire) → bias in [-100, 100]."""
    if not raw:
        return None
    out: dict[int, float] = {}
    for key, value in raw.items():
        if not key.isdigit() or int(key) > MAX_TOKEN_ID:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids, got {key[:32]!r}", param="logit_bias"
            )
        if not -100.0 <= value <= 100.0:
            raise InvalidRequestError(
                f"logit_bias values must be between -100 and 100, got {value} for token {key}",
                param="logit_bias",
            )
        out[int(key)] = float(value)
    return out


def response_format_json(response_format: dict[str, Any] | None) -> str | None:
    """The JSON text of a ``response_format`` to constrain the output with; None for text.

    The worker compiles the schema (an invalid one fails there with a 400 too); here only the
    shape is checked.
    """
    if response_format is None:
        return None
    kind = response_format.get("type", "text")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise InvalidRequestError(
            f"response_format.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, "
            f"got {str(kind)[:32]!r}",
            param="response_format",
        )
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidRequestError(
                "response_format.json_schema.schema must be a JSON schema object",
                param="response_format",
            )
    return json.dumps(response_format, separators=(",", ":"))


def _stop_list(stop: str | list[str] | None) -> list[str]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    return [check_text(s, "stop") for s in items if s]
