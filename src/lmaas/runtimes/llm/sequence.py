"""One generating sequence: its tokens, its stop conditions and the text it has produced.

Plain Python over token ids, with no model in sight: the runner chooses the next token, and
:meth:`GenerationSequence.append` turns it into a :class:`SeqDelta` (or the final one).
"""

from __future__ import annotations

from collections.abc import Collection

from lmaas.core.messages import SamplingParams, SeqDelta
from lmaas.runtimes.llm.detokenize import IncrementalDetokenizer, TokenDecoder
from lmaas.runtimes.llm.stop import StopStringFilter

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class GenerationSequence:
    """The decoding state of one request.

    Args:
        request_id: The request's id.
        prompt_ids: The tokenized prompt.
        params: Sampling parameters (their ``max_tokens`` may be None).
        max_tokens: Tokens this sequence may generate at most, already resolved against the
            context length.
        tokenizer: For detokenisation.
        eos_ids: Token ids that end the sequence unless ``ignore_eos``.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        tokenizer: TokenDecoder,
        eos_ids: Collection[int],
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self._stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(eos_ids)
        )
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop_filter = StopStringFilter(params.stop)
        self._sent_first = False

    def banned_ids(self) -> frozenset[int]:
        """Ids the next token may not be: stop ids (EOS included) until ``min_tokens`` is met."""
        if len(self.output_ids) < self.params.min_tokens:
            return self._stop_ids
        return frozenset()

    def append(self, token_id: int) -> SeqDelta:
        """Record the chosen token and return this step's delta (final when finished)."""
        self.output_ids.append(token_id)
        num_generated = len(self.output_ids)
        can_stop = num_generated >= self.params.min_tokens
        if can_stop and token_id in self._stop_ids:
            # The stop token itself is not part of the text the client sees.
            self.finish_reason = FINISH_STOP
            return self._delta(self._release_all())
        piece = self._detokenizer.push(token_id)
        if can_stop:
            text, matched = self._stop_filter.feed(piece)
            if matched:
                self.finish_reason = FINISH_STOP
                return self._delta(text)
        else:
            text = self._stop_filter.flush() + piece
        if num_generated >= self.max_tokens:
            self.finish_reason = FINISH_LENGTH
            text += self._release_all()
        return self._delta(text)

    def close(self, reason: str) -> str:
        """End the sequence for a reason found outside it (a finished grammar); returns the
        text still held back."""
        self.finish_reason = reason
        return self._release_all()

    def _release_all(self) -> str:
        """The sequence ends: complete the held-back text, still honouring stop strings."""
        tail, matched = self._stop_filter.feed(self._detokenizer.flush())
        if matched:
            self.finish_reason = FINISH_STOP
            return tail
        return tail + self._stop_filter.flush()

    def _delta(self, text: str) -> SeqDelta:
        prompt_tokens = 0 if self._sent_first else len(self.prompt_ids)
        self._sent_first = True
        return SeqDelta(
            request_id=self.request_id,
            text=text,
            num_new_tokens=1,
            finish_reason=self.finish_reason,
            prompt_tokens=prompt_tokens,
        )
