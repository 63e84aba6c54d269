"""Chat templates rendered in a sandbox: a model's template is data, never trusted code."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmaas.core.errors import InvalidRequestError, ModelLoadError
from lmaas.core.messages import ChatMessage


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: object, indent: int | None = None) -> str:
    # Jinja's own tojson escapes <, > and & for HTML; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A model's chat template, compiled once in an immutable sandboxed Jinja environment.

    The template comes from the model's tokenizer config, never from a request. The sandbox
    refuses attribute access such as ``''.__class__.__mro__`` and any mutation of the inputs.

    Args:
        source: The Jinja source.
        special_tokens: ``bos_token``, ``eos_token``, … as the template expects them.

    Raises:
        ModelLoadError: the template does not compile.
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(f"the model's chat template does not compile: {exc}") from exc
        self._special_tokens = dict(special_tokens)

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> str:
        """Render ``messages``.

        Raises:
            InvalidRequestError: the template rejects the conversation (``raise_exception``),
                or tries an operation the sandbox forbids.
        """
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._template.render(
                messages=conversation,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except SecurityError as exc:
            raise InvalidRequestError(
                f"the model's chat template tried an operation the sandbox forbids: {exc}",
                param="messages",
            ) from exc
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as exc:
            raise InvalidRequestError(
                f"the model's chat template rejected the messages: {exc}", param="messages"
            ) from exc
