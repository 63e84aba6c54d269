"""LLMEngine: the step loop of continuous batching (schedule → execute → update).

It implements the worker's ``GenerationRunner`` protocol, so the worker loop drives it like any
other runner: requests join and leave between steps, and every ``step()`` returns the new text
of every running sequence. Scheduling and KV blocks are plain Python (:mod:`.scheduler`,
:mod:`.blocks`); the model runs behind the :class:`~.protocol.ModelRunner` seam.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from lmaas.core.errors import InvalidRequestError, ModelNotReadyError
from lmaas.core.messages import (
    GenerateRequest,
    ModelInfo,
    SamplingParams,
    SeqDelta,
    TokenLogprob,
)
from lmaas.engine.llm.protocol import ModelRunner, PromptProcessor
from lmaas.engine.llm.scheduler import Scheduler, SchedulerConfig
from lmaas.engine.llm.sequence import SchedSequence
from lmaas.runtimes.llm.batch import Sampled, SamplingConfig, TokenGuide
from lmaas.runtimes.llm.prompt import refuse_beam_search, resolve_max_tokens
from lmaas.runtimes.llm.sequence import FINISH_STOP, GenerationSequence

_log = logging.getLogger("lmaas.engine.llm")

_STAT_NAMES = {
    "running": "num_running",
    "waiting": "num_waiting",
    "kv_free_blocks": "num_free_blocks",
    "kv_total_blocks": "num_blocks",
    "kv_cached_blocks": "num_cached_blocks",
    "prefix_cache_hit_tokens": "prefix_cache_hit_tokens",
    "prefix_cache_query_tokens": "prefix_cache_query_tokens",
    "preemptions": "num_preemptions",
}

GuideFactory = Callable[[str], TokenGuide | None]
"""Compiles a ``response_format`` (JSON text) into a guide; None when it constrains nothing."""


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """How the engine sizes its cache and batches (from the manifest's ``serving`` section)."""

    scheduler: SchedulerConfig
    kv_cache_bytes: int | None = None
    """KV budget; None lets the runner take its default share of free memory."""


@dataclass(slots=True)
class _Choice:
    """One output sequence: scheduler state, text state, and where its deltas go."""

    sched: SchedSequence
    text: GenerationSequence
    index: int


class LLMEngine:
    """Continuous batching over a paged KV cache.

    Args:
        runner: Runs the model (torch side).
        make_prompts: Builds the tokenizer side once the model is loaded (vocab size known).
        config: Scheduler limits and KV budget.
        make_guide: Compiles ``response_format``; None disables guided decoding.
    """

    def __init__(
        self,
        runner: ModelRunner,
        make_prompts: Callable[[ModelInfo], PromptProcessor],
        config: EngineConfig,
        make_guide: Callable[[PromptProcessor], GuideFactory] | None = None,
    ) -> None:
        self._runner = runner
        self._make_prompts = make_prompts
        self._make_guide = make_guide
        self._config = config
        self._prompts: PromptProcessor | None = None
        self._guides: GuideFactory | None = None
        self._scheduler: Scheduler | None = None
        self._info: ModelInfo | None = None
        self._choices: dict[int, _Choice] = {}
        self._by_request: dict[str, list[int]] = {}
        self._seq_ids = itertools.count()

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> ModelInfo:
        info = self._runner.load()
        # Without a budget, no more than every running sequence at full context could fill.
        max_useful_tokens = self._config.scheduler.max_num_seqs * info.context_length
        layout = self._runner.allocate_kv_cache(
            self._config.kv_cache_bytes, self._config.scheduler.block_size, max_useful_tokens
        )
        self._scheduler = Scheduler(self._config.scheduler, layout.num_blocks)
        self._prompts = self._make_prompts(info)
        if self._make_guide is not None:
            self._guides = self._make_guide(self._prompts)
        self._info = info
        _log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB, %.1f MiB with the decode view)",
            layout.num_blocks,
            layout.block_size,
            layout.num_blocks * layout.bytes_per_block / 2**20,
            layout.total_bytes / 2**20,
        )
        return info

    def warmup(self) -> None:
        request = GenerateRequest(
            "warmup", SamplingParams(max_tokens=2, ignore_eos=True), prompt_token_ids=[0, 1, 2]
        )
        self.add_request(request)
        while self.has_work():
            self.step()

    def health(self) -> bool:
        return self._scheduler is not None

    # ------------------------------------------------------------------ requests

    def add_request(self, request: GenerateRequest) -> None:
        """Tokenize and queue; n > 1 shares the prompt's blocks. Raises: InvalidRequestError,
        OverloadedError (waiting queue full)."""
        scheduler, prompts, info = self._loaded()
        if request.request_id in self._by_request:
            raise InvalidRequestError(f"duplicate request id {request.request_id!r}")
        refuse_beam_search(request)
        prompt_ids = prompts.prompt_ids(request)
        # A small KV budget can hold less than the model's context: the cache is the limit then.
        context_length = min(info.context_length, scheduler.max_seq_len)
        max_tokens = resolve_max_tokens(request, len(prompt_ids), context_length)
        num_choices = max(1, request.sampling.n)
        choices = [
            self._new_choice(request, prompt_ids, max_tokens, index, prompts)
            for index in range(num_choices)
        ]
        if num_choices == 1:
            scheduler.add(choices[0].sched)
        else:
            scheduler.add_group([c.sched for c in choices])
        for choice in choices:
            self._choices[choice.sched.seq_id] = choice
        self._by_request[request.request_id] = [c.sched.seq_id for c in choices]

    def abort(self, request_id: str) -> None:
        for seq_id in self._by_request.pop(request_id, []):
            self._choices.pop(seq_id, None)
        if self._scheduler is not None:
            self._scheduler.abort_request(request_id)

    def has_work(self) -> bool:
        return self._scheduler is not None and self._scheduler.has_work()

    def num_running(self) -> int:
        return self._scheduler.num_running if self._scheduler is not None else 0

    def stats(self) -> dict[str, int]:
        """Engine counters under the names the gateway exports (``lmaas_engine_stat``)."""
        if self._scheduler is None:
            return {}
        raw = self._scheduler.stats()
        return {name: raw[key] for name, key in _STAT_NAMES.items() if key in raw}

    def step(self) -> list[SeqDelta]:
        """Schedule → execute → update; returns this step's deltas of every sequence."""
        scheduler = self._scheduler
        if scheduler is None or not scheduler.has_work():
            return []
        batch = scheduler.schedule()
        if not batch.slots:
            return []
        sampled = self._runner.execute(batch)
        deltas = []
        for sched, result in scheduler.on_step_done(batch, sampled):
            choice = self._choices.get(sched.seq_id)
            if choice is not None:
                deltas.append(self._advance(choice, result))
        return deltas

    # ------------------------------------------------------------------ internals

    def _loaded(self) -> tuple[Scheduler, PromptProcessor, ModelInfo]:
        if self._scheduler is None or self._prompts is None or self._info is None:
            raise ModelNotReadyError("the model is not loaded yet")
        return self._scheduler, self._prompts, self._info

    def _new_choice(
        self,
        request: GenerateRequest,
        prompt_ids: list[int],
        max_tokens: int,
        index: int,
        prompts: PromptProcessor,
    ) -> _Choice:
        params = request.sampling
        seq_id = next(self._seq_ids)
        text = GenerationSequence(
            request.request_id,
            prompt_ids,
            params,
            max_tokens,
            prompts.decoder,
            prompts.eos_token_ids,
        )
        sched = SchedSequence(
            seq_id=seq_id,
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            history=list(prompt_ids),
            sampling=_sampling_config(params, index),
            max_tokens=max_tokens,
            namespace="",
            arrival=time.monotonic(),
            tenant=request.tenant,
            weight=request.tenant_weight,
        )
        sched.banned_token_ids = text.banned_ids()
        sched.choice_index = index
        sched.group_id = request.request_id
        if params.response_format and self._guides is not None:
            sched.guide = self._guides(params.response_format)
        return _Choice(sched=sched, text=text, index=index)

    def _advance(self, choice: _Choice, result: Sampled) -> SeqDelta:
        sched, text = choice.sched, choice.text
        delta = text.append(result.token_id)
        guide = sched.guide
        if guide is not None and delta.finish_reason is None:
            guide.accept(result.token_id)
            if guide.is_finished():
                tail = text.close(FINISH_STOP)
                delta = msgspec.structs.replace(
                    delta, text=delta.text + tail, finish_reason=text.finish_reason
                )
        sched.banned_token_ids = text.banned_ids()
        if choice.index:
            delta = msgspec.structs.replace(delta, index=choice.index, prompt_tokens=0)
        if result.logprob is not None:
            delta = msgspec.structs.replace(delta, logprobs=[self._logprob(result)])
        if delta.finish_reason is not None:
            self._finish(sched)
        return delta

    def _logprob(self, result: Sampled) -> TokenLogprob:
        prompts = self._prompts
        assert prompts is not None
        top = [(prompts.token_text(t), lp) for t, lp in result.top_logprobs or ()]
        return TokenLogprob(prompts.token_text(result.token_id), result.logprob or 0.0, top)

    def _finish(self, sched: SchedSequence) -> None:
        assert self._scheduler is not None
        self._scheduler.finish(sched.seq_id)
        self._choices.pop(sched.seq_id, None)
        remaining = [s for s in self._by_request.get(sched.request_id, []) if s in self._choices]
        if remaining:
            self._by_request[sched.request_id] = remaining
        else:
            self._by_request.pop(sched.request_id, None)


def _sampling_config(params: SamplingParams, index: int) -> SamplingConfig:
    # Each choice of a seeded request gets its own stream: seed, seed + 1, ...
    seed = params.seed + index if params.seed is not None else None
    bias = params.logit_bias or {}
    return SamplingConfig(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        seed=seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=tuple(sorted((int(k), float(v)) for k, v in bias.items())),
        num_logprobs=params.logprobs,
    )
