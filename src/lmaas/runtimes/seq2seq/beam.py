"""Beam search over one request's beams, with the semantics of ``transformers``' ``generate()``.

:class:`BeamSearch` keeps the running beams and the finished hypotheses of one request; the
runner decodes its ``num_beams`` rows in the same batched decoder forward as every other row and
hands :meth:`BeamSearch.advance` their processed next-token log-probabilities. The arithmetic
follows ``GenerationMixin._beam_search`` (checked against transformers 5.24) step for step,
with the same tensor shapes and operations, so that the selection, ties included, is the one
``generate(num_beams=k, do_sample=False)`` makes:

* each step keeps the top ``max(2, 1 + number of stop ids) * num_beams`` continuations of all
  beams by accumulated log-probability; of these, the best ``num_beams`` that did not hit a stop
  id (or the length limit) run on;
* a continuation among the top ``num_beams`` that hits a stop id (EOS) or the length limit
  becomes a finished hypothesis with score ``sum of log-probs / length ** length_penalty``
  (length counts generated tokens, the stop token included); the ``num_beams`` best are kept;
* ``early_stopping=True`` ends the request once ``num_beams`` hypotheses are finished;
  ``False`` once no running beam can beat the worst finished one, estimated at the current
  length; ``"never"`` the same, estimated at the maximum length when ``length_penalty > 0``;
  the length limit ends it in any case.

The ``-1e9`` masks are transformers' own: a score pushed below them cannot be picked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmaas.core.messages import SamplingParams
from lmaas.runtimes.seq2seq.decoding import DecodingRules

_MASK = -1.0e9


@dataclass(frozen=True, slots=True)
class BeamSettings:
    """How one request searches."""

    num_beams: int
    num_return: int
    """The best hypotheses returned, as choices (``n``); at most ``num_beams``."""
    length_penalty: float
    early_stopping: bool | str
    """True, False or ``"never"`` (HF semantics)."""
    max_tokens: int
    stop_ids: frozenset[int]
    """Tokens that finish a hypothesis (EOS unless ``ignore_eos``, and ``stop_token_ids``)."""


class BeamSearch:
    """The beams of one request.

    Args:
        settings: Width, scoring and limits.
        device: Where the log-probabilities come from (the state tensors live there too).
    """

    def __init__(self, settings: BeamSettings, device: torch.device) -> None:
        num_beams = settings.num_beams
        self.settings = settings
        self.beams: list[list[int]] = [[] for _ in range(num_beams)]
        """The generated tokens of each running beam (all of the same length)."""
        self.done = False
        self._device = device
        self._running_scores = torch.zeros((1, num_beams), dtype=torch.float, device=device)
        # Only the first beam starts live: the others would repeat its continuations.
        self._running_scores[:, 1:] = _MASK
        self._finished: list[list[int]] = [[] for _ in range(num_beams)]
        self._finished_scores = torch.full((1, num_beams), _MASK, device=device)
        self._is_finished = torch.zeros((1, num_beams), dtype=torch.bool, device=device)
        self._improvable = torch.ones((1, 1), dtype=torch.bool, device=device)
        self._num_candidates = max(2, 1 + len(settings.stop_ids)) * num_beams
        self._top_mask = torch.arange(self._num_candidates, device=device) < num_beams

    @property
    def num_generated(self) -> int:
        """Tokens in each running beam."""
        return len(self.beams[0])

    def advance(self, log_probs: torch.Tensor) -> list[int]:
        """One step of every beam.

        Args:
            log_probs: ``[num_beams, vocab]`` float32 next-token log-probabilities of the running
                beams, after the decoding rules (banned tokens at ``-inf``).

        Returns:
            For each new running beam, the index of the old beam it extends: the KV cache rows
            to keep, in order. Meaningless once :attr:`done`.
        """
        settings = self.settings
        vocab = log_probs.shape[-1]
        scores = (log_probs[None] + self._running_scores[:, :, None]).reshape(1, -1)
        top_scores, top_index = torch.topk(scores, k=self._num_candidates)
        origins = (top_index // vocab)[0].tolist()
        tokens = (top_index % vocab)[0].tolist()
        candidates = [[*self.beams[o], t] for o, t in zip(origins, tokens, strict=True)]
        at_limit = self.num_generated + 1 >= settings.max_tokens
        hits = torch.tensor(
            [[at_limit or t in settings.stop_ids for t in tokens]], device=self._device
        )
        running = top_scores + hits.to(torch.float32) * _MASK
        keep = torch.topk(running, k=settings.num_beams)[1]
        self._running_scores = running.gather(1, keep)
        keep_list = keep[0].tolist()
        self.beams = [candidates[j] for j in keep_list]
        self._update_finished(top_scores, candidates, hits)
        self._update_done(hits)
        return [origins[j] for j in keep_list]

    def best(self) -> list[list[int]]:
        """The generated tokens of the ``num_return`` best hypotheses, best first."""
        return self._finished[: self.settings.num_return]

    def _update_finished(
        self, top_scores: torch.Tensor, candidates: list[list[int]], hits: torch.Tensor
    ) -> None:
        settings = self.settings
        # Only the top num_beams continuations may finish; the rest are spares to run on.
        just_finished = hits & self._top_mask[None, :]
        scores = top_scores / (len(candidates[0]) ** settings.length_penalty)
        full = torch.all(self._is_finished, dim=-1, keepdim=True) & (
            settings.early_stopping is True
        )
        scores = scores + full.to(torch.float32) * _MASK
        scores = scores + (~self._improvable).to(torch.float32) * _MASK
        scores = scores + (~just_finished) * _MASK
        merged_scores = torch.cat((self._finished_scores, scores), dim=1)
        merged_finished = torch.cat((self._is_finished, just_finished), dim=1)
        merged = self._finished + candidates
        pick = torch.topk(merged_scores, k=settings.num_beams)[1]
        self._finished_scores = merged_scores.gather(1, pick)
        self._is_finished = merged_finished.gather(1, pick)
        self._finished = [merged[j] for j in pick[0].tolist()]

    def _update_done(self, hits: torch.Tensor) -> None:
        settings = self.settings
        if settings.early_stopping == "never" and settings.length_penalty > 0.0:
            best_length = settings.max_tokens
        else:
            best_length = self.num_generated
        best_running = self._running_scores[:, :1] / (best_length**settings.length_penalty)
        worst_finished = torch.where(
            self._is_finished, torch.min(self._finished_scores, dim=1, keepdim=True)[0], _MASK
        )
        self._improvable = self._improvable & torch.any(
            best_running > worst_finished, dim=-1, keepdim=True
        )
        all_finished = bool(torch.all(self._is_finished))
        self.done = (
            not bool(torch.any(self._improvable))
            or (all_finished and settings.early_stopping is True)
            or bool(torch.all(hits))
        )


def beam_log_probs(
    beam: BeamSearch, logits: torch.Tensor, rules: DecodingRules, params: SamplingParams
) -> torch.Tensor:
    """The beams' next-token log-probabilities under the decoding rules, as transformers'
    logits processors leave them in beam search: a forced token at 0 and every other at
    ``-inf``, else banned tokens (and stop ids before ``min_tokens``) at ``-inf``.

    Args:
        beam: The request's beams.
        logits: ``[num_beams, vocab]`` float32 logits of its rows.
        rules: The checkpoint's decoding rules.
        params: The request's parameters (``ignore_eos``, ``min_tokens``).
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    position = beam.num_generated
    forced = rules.forced_token(position, beam.settings.max_tokens, params.ignore_eos)
    if forced is not None:
        log_probs = torch.full_like(log_probs, -math.inf)
        log_probs[:, forced] = 0.0
        return log_probs
    stop_until_min = beam.settings.stop_ids if position < params.min_tokens else frozenset()
    for row, tokens in enumerate(beam.beams):
        banned = rules.banned(tokens, params.ignore_eos) | stop_until_min
        if banned:
            log_probs[row, sorted(banned)] = -math.inf
    return log_probs
