"""The batched sampler of the paged LLM runner: one call per engine step, vectorised over rows.

Order of processing, each stage skipped when no row in the batch uses it:

1. ``logit_bias``; 2. the guide mask (guided decoding); 3. ``banned_token_ids`` (-inf; a guided
row whose every allowed id is banned keeps its guide mask alone, so it never samples garbage);
4. ``repetition_penalty`` (HF: over prompt + output, positive logits divided, negative
multiplied); 5. ``presence_penalty`` / ``frequency_penalty`` (OpenAI: over output tokens,
``logit -= presence * (count > 0) + frequency * count``); then greedy rows take the argmax and
sampled rows go through temperature, top-k, min-p, top-p and one draw.

**Logprobs** are the log-softmax of the logits after stages 1-5 and before temperature /
top-k / top-p / min-p: vLLM's default ("raw" logprobs of the processed logits). Ids masked to
-inf report :data:`MIN_LOGPROB` so the JSON stays finite.

**Seeds.** A seeded row's randomness at output position ``t`` comes from a generator seeded with
``mix(seed, t)`` (splitmix64), so its tokens depend only on its own logits, seed and position:
not on its batch neighbours, on how many steps the others take, or on the device. A preempted
sequence that is recomputed therefore draws exactly the same tokens again (its history, hence
its positions and logits, are the same). No per-sequence state is kept; :meth:`Sampler.free`
exists for the runner contract and drops nothing. Unseeded rows share one generator.

``logits`` is modified in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from lmaas.runtimes.llm import logits_ops
from lmaas.runtimes.llm.batch import Sampled, SeqSlot
from lmaas.runtimes.llm.sampling_kernels import (
    MAX_ROUNDS,
    apply_floors,
    block_argmax,
    block_topk,
    sample_top_p,
)

MIN_LOGPROB = -9999.0
"""Reported instead of -inf (as vLLM does): JSON has no infinities."""
_MASK64 = (1 << 64) - 1


def step_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, output position): decorrelated seeds for successive draws."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(slots=True)
class _Plan:
    """Which rows use which stage, found in one pass over the slots."""

    bias: list[int] = field(default_factory=list)
    guided: list[int] = field(default_factory=list)
    banned: list[int] = field(default_factory=list)
    repetition: list[int] = field(default_factory=list)
    presence: list[int] = field(default_factory=list)
    greedy: list[int] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)
    logprobs: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, slots: Sequence[SeqSlot]) -> _Plan:
        plan = cls()
        for row, slot in enumerate(slots):
            config = slot.sampling
            if config.logit_bias:
                plan.bias.append(row)
            if slot.guide is not None:
                plan.guided.append(row)
            if slot.banned_token_ids:
                plan.banned.append(row)
            if config.repetition_penalty != 1.0:
                plan.repetition.append(row)
            if config.presence_penalty != 0.0 or config.frequency_penalty != 0.0:
                plan.presence.append(row)
            (plan.greedy if config.temperature == 0.0 else plan.sampled).append(row)
            if config.num_logprobs is not None:
                plan.logprobs.append(row)
        return plan


class Sampler:
    """Picks the next token of every row of a step's logits (see the module docstring).

    Args:
        device: Where the logits live; random draws are made on the CPU and moved there.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._shared = torch.Generator()
        self._shared.seed()
        self._scratch = torch.Generator()

    def free(self, seq_ids: Iterable[int]) -> None:
        """Forget finished / preempted sequences. Seeded draws are derived from (seed, position)
        and hold no state, so there is nothing to drop; kept for the runner contract."""
        del seq_ids

    def sample(self, logits: torch.Tensor, slots: Sequence[SeqSlot]) -> list[Sampled]:
        """One :class:`Sampled` per row of ``logits`` (float32 ``[len(slots), vocab]``)."""
        plan = _Plan.of(slots)
        self._process(logits, slots, plan)
        logprobs = None
        if plan.logprobs:
            rows = torch.tensor(plan.logprobs, dtype=torch.long, device=logits.device)
            every = len(plan.logprobs) == len(slots)
            logprobs = torch.log_softmax(logits if every else logits.index_select(0, rows), -1)
        tokens = torch.empty(len(slots), dtype=torch.long, device=logits.device)
        if plan.greedy:
            rows = torch.tensor(plan.greedy, dtype=torch.long, device=logits.device)
            greedy = logits if len(plan.greedy) == len(slots) else logits.index_select(0, rows)
            tokens[rows] = block_argmax(greedy)
        if plan.sampled:
            rows = torch.tensor(plan.sampled, dtype=torch.long, device=logits.device)
            tokens[rows] = self._draw(logits, slots, plan.sampled, rows)
        token_ids: list[int] = tokens.tolist()
        if logprobs is None:
            return [Sampled(token_id) for token_id in token_ids]
        return _with_logprobs(token_ids, slots, plan.logprobs, logprobs)

    @staticmethod
    def _process(logits: torch.Tensor, slots: Sequence[SeqSlot], plan: _Plan) -> None:
        if plan.bias:
            logits_ops.apply_logit_bias(logits, slots, plan.bias)
        if plan.guided:
            logits_ops.apply_guides(logits, slots, plan.guided)
        if plan.banned:
            _ban(logits, slots, plan)
        if plan.repetition:
            logits_ops.apply_repetition_penalty(logits, slots, plan.repetition)
        if plan.presence:
            logits_ops.apply_presence_frequency(logits, slots, plan.presence)

    def _draw(
        self, logits: torch.Tensor, slots: Sequence[SeqSlot], rows: list[int], index: torch.Tensor
    ) -> torch.Tensor:
        configs = [slots[r].sampling for r in rows]
        x = logits if len(rows) == logits.shape[0] else logits.index_select(0, index)
        if any(c.temperature != 1.0 for c in configs):
            inverse_t = torch.tensor([1.0 / c.temperature for c in configs], dtype=x.dtype)
            x = x.mul_(inverse_t.to(x.device)[:, None])
        probs = torch.softmax(x, dim=-1)
        top_k = torch.tensor([c.top_k for c in configs], dtype=torch.long)
        min_p = torch.tensor([c.min_p for c in configs], dtype=torch.float32)
        if bool((top_k > 0).any()) or bool((min_p > 0).any()):
            probs = apply_floors(probs, top_k.to(x.device), min_p.to(x.device))
        top_p = torch.tensor([c.top_p for c in configs], dtype=torch.float32).to(x.device)
        uniforms = self._uniforms(slots, rows).to(x.device)
        return sample_top_p(probs, top_p, uniforms)

    def _uniforms(self, slots: Sequence[SeqSlot], rows: list[int]) -> torch.Tensor:
        """``[len(rows), MAX_ROUNDS + 1]`` uniforms in (0, 1]: seeded rows from their own
        (seed, position) stream, the others from the shared generator."""
        width = MAX_ROUNDS + 1
        # 1 - U[0, 1) lies in (0, 1]: a zero target could land on a zero-probability id.
        out = 1.0 - torch.rand((len(rows), width), generator=self._shared)
        for i, row in enumerate(rows):
            slot = slots[row]
            seed = slot.sampling.seed
            if seed is None:
                continue
            position = len(slot.history) - slot.num_prompt_tokens
            self._scratch.manual_seed(step_seed(seed, position))
            out[i] = 1.0 - torch.rand(width, generator=self._scratch)
        return out


def _ban(logits: torch.Tensor, slots: Sequence[SeqSlot], plan: _Plan) -> None:
    """Ban ids; a guided row left with nothing allowed keeps its guide mask instead."""
    guided = set(plan.guided)
    at_risk = [r for r in plan.banned if r in guided]
    saved = logits[at_risk].clone() if at_risk else None
    logits_ops.apply_banned(logits, slots, plan.banned)
    if saved is None:
        return
    dead = torch.isneginf(logits[at_risk].amax(-1))
    if bool(dead.any()):
        rows = torch.tensor(at_risk, dtype=torch.long, device=logits.device)[dead]
        logits[rows] = saved[dead]


def _with_logprobs(
    token_ids: list[int], slots: Sequence[SeqSlot], rows: list[int], logprobs: torch.Tensor
) -> list[Sampled]:
    out = [Sampled(token_id) for token_id in token_ids]
    chosen = torch.tensor([token_ids[r] for r in rows], dtype=torch.long, device=logprobs.device)
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1).clamp(min=MIN_LOGPROB).tolist()
    counts = [slots[r].sampling.num_logprobs or 0 for r in rows]
    k = min(max(counts), logprobs.shape[1])
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if k > 0:
        values, ids = block_topk(logprobs, k)
        top_values = values.clamp(min=MIN_LOGPROB).tolist()
        top_ids = ids.tolist()
    for i, row in enumerate(rows):
        alternatives = None
        if counts[i] > 0:
            alternatives = tuple(
                zip(top_ids[i][: counts[i]], top_values[i][: counts[i]], strict=True)
            )
        out[row] = Sampled(token_ids[row], chosen_lp[i], alternatives)
    return out
