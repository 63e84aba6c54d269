"""The decoding parameters chat and completions share, and their mapping to SamplingParams."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from lmaas.api.openai.base import (
    MAX_NUM_STOP,
    MAX_STOP_CHARS,
    MAX_TOKENS_LIMIT,
    OpenAIBaseModel,
    check_text,
    reject_set,
)
from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import SamplingParams
from lmaas.engine.protocol import ServedModel

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


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
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    chat_template: Any = None
    """Never honoured: a template from a request could run arbitrary Jinja."""

    def common_rejections(self) -> dict[str, bool]:
        return {
            "logit_bias": bool(self.logit_bias),
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
            "chat_template": self.chat_template is not None,
        }

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def to_sampling(self, model: ServedModel, max_tokens: int | None) -> SamplingParams:
        """Validated :class:`SamplingParams`; temperature 0 means greedy.

        Raises:
            InvalidRequestError: n ≠ 1, an unsupported parameter, or limits that contradict.
        """
        _check_n(self.n)
        reject_set(self.common_rejections())
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
        temperature = 1.0 if self.temperature is None else self.temperature
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
        )


def _check_n(n: int | None) -> None:
    if n is None or n == 1:
        return
    if n < 1:
        raise InvalidRequestError(f"n must be at least 1, got {n}", param="n")
    raise InvalidRequestError("n > 1 is not supported yet", param="n")


def _stop_list(stop: str | list[str] | None) -> list[str]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    return [check_text(s, "stop") for s in items if s]
