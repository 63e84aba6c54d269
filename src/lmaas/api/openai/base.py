"""Pieces shared by the OpenAI endpoint schemas: the base model, limits and checks."""

from __future__ import annotations

import logging
from typing import Self

from pydantic import BaseModel, ConfigDict, model_validator

from lmaas.core.errors import InvalidRequestError
from lmaas.core.types import Task
from lmaas.engine.protocol import EngineClient, ServedModel

logger = logging.getLogger("lmaas.api")

MAX_TOKENS_LIMIT = 1 << 20
"""Upper bound of max_tokens / min_tokens / top_k: far above any context, far below overflow."""
MAX_NUM_STOP = 8
MAX_STOP_CHARS = 256
MAX_NUM_MESSAGES = 4096
MAX_NUM_EMBED_INPUTS = 2048
MAX_TOKEN_ID = 2**31 - 1


class OpenAIBaseModel(BaseModel):
    """Wire schema base: unknown keys are accepted and logged (vLLM ``OpenAIBaseModel``)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _log_ignored_keys(self) -> Self:
        if self.model_extra:
            names = sorted(self.model_extra)[:16]
            logger.info("%s: ignoring unknown fields %s", type(self).__name__, names)
        return self


def check_text(value: str, param: str) -> str:
    """Refuse strings that cannot be UTF-8 encoded (lone surrogates): one policy, 400."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(
            f"'{param}' holds invalid unicode (a lone surrogate)", param=param
        ) from None
    return value


def reject_set(checks: dict[str, bool]) -> None:
    """Raise for the first parameter set to a value lmaas does not support.

    Args:
        checks: parameter name → True when the request sets it to a non-default value.
    """
    for name, is_set in checks.items():
        if is_set:
            raise InvalidRequestError(f"'{name}' is not supported", param=name)


def resolve_model(engine: EngineClient, name: str, allowed: set[Task], route: str) -> ServedModel:
    """The served model ``name``, checked to have a task this route accepts.

    Raises:
        ModelNotFoundError: no such model (404).
        InvalidRequestError: the model's task does not fit the route.
    """
    model = engine.get_model(name)
    if model.task in allowed:
        return model
    if route == "/v1/chat/completions" and model.task is Task.COMPLETION:
        message = (
            f"model '{name}' is a completion model without a chat template; use /v1/completions"
        )
    elif route == "/v1/chat/completions" and model.task is Task.SEQ2SEQ:
        message = (
            f"model '{name}' is a seq2seq (translation / summarisation) model without a chat "
            "template; send its input text as the prompt of /v1/completions"
        )
    else:
        message = f"model '{name}' is a {model.task.value} model and cannot serve {route}"
    raise InvalidRequestError(message, param="model")
