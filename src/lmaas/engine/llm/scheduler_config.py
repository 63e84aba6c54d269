"""Limits of the LLM scheduler (:mod:`lmaas.engine.llm.scheduler`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmaas.core.errors import InvalidRequestError
from lmaas.engine.llm.sequence import SchedSequence, SeqStatus


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    """Limits of the LLM scheduler.

    Raises:
        ValueError: A limit out of range; the message quotes it.
    """

    max_num_seqs: int = 64
    """Sequences running at once (each ``n > 1`` choice counts)."""
    max_num_batched_tokens: int = 2048
    """Tokens computed per step, prefill chunks and decodes together."""
    max_waiting: int = 256
    """Requests queued before ``Scheduler.add`` refuses with OverloadedError (503)."""
    block_size: int = 16
    """Tokens per KV block."""
    enable_prefix_caching: bool = True
    """Reuse full blocks of identical prefixes (same namespace) across requests."""
    max_chunk_tokens: int | None = None
    """Largest prefill chunk of one sequence per step (None: the token budget). Smaller chunks
    bound the time one step takes, hence the inter-token latency of running streams."""
    retry_after_s: float = 1.0
    """Suggested wait given with OverloadedError."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "block_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} ({value}) must be at least 1")
        if self.max_chunk_tokens is not None and self.max_chunk_tokens < 1:
            raise ValueError(f"max_chunk_tokens ({self.max_chunk_tokens}) must be at least 1")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s ({self.retry_after_s}) must not be negative")


def check_group(config: SchedulerConfig, max_seq_len: int, seqs: Sequence[SchedSequence]) -> None:
    """Refuse a request's sequences that could never run under these limits.

    Args:
        config: The limits.
        max_seq_len: Tokens the whole KV cache holds.
        seqs: The ``n`` new sequences of one request.

    Raises:
        InvalidRequestError: More sequences than ``max_num_seqs``, or prompt + ``max_tokens``
            beyond the cache (a sequence must fit on its own to be sure to finish).
        ValueError: Empty group, a sequence not new or not starting where the first one does.
    """
    if not seqs:
        raise ValueError("add_group needs at least one sequence")
    leader = seqs[0]
    for seq in seqs:
        if seq.status is not SeqStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} is not new")
        if seq.history != leader.history:
            raise ValueError(f"sequence {seq.seq_id} does not start where its group does")
    if len(seqs) > config.max_num_seqs:
        raise InvalidRequestError(
            f"n ({len(seqs)}) exceeds max_num_seqs ({config.max_num_seqs})", param="n"
        )
    num_prompt = len(leader.history)
    max_tokens = max(seq.max_tokens for seq in seqs)
    if num_prompt + max_tokens > max_seq_len:
        raise InvalidRequestError(
            f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) exceed the KV cache "
            f"({max_seq_len} tokens)",
            param="max_tokens",
        )
