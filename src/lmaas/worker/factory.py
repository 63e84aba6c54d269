"""Pick and build the runner of a worker spec: the LLM engine for text generation, the runtime
catalog for everything else, or a custom ``module:factory`` named in the manifest."""

from __future__ import annotations

import importlib

from lmaas.core.backends import resolve_backend
from lmaas.core.errors import ModelLoadError
from lmaas.core.messages import ModelInfo, WorkerSpec
from lmaas.core.types import ModelFormat, Task
from lmaas.engine.llm.core import EngineConfig, GuideFactory, LLMEngine
from lmaas.engine.llm.protocol import PromptProcessor
from lmaas.engine.llm.scheduler import SchedulerConfig
from lmaas.runtimes.base import Runner

_GENERATION = {Task.CHAT.value, Task.COMPLETION.value}


def create_runner(spec: WorkerSpec) -> Runner:
    """Raises: ModelLoadError (custom runner not importable), NotSupportedError (no runtime
    serves the spec's task and format on its ``backend``)."""
    custom = spec.options.get("runner")
    if custom:
        return _custom_runner(custom, spec)
    # The engine below is torch: a version that asks for another library fails here, as the
    # catalog's runners do, instead of silently running on torch.
    resolve_backend(spec.task, spec.format, spec.options.get("backend", "auto"))
    engine = spec.options.get("engine", "paged")
    if spec.task in _GENERATION and spec.format == ModelFormat.SAFETENSORS and engine == "paged":
        return _llm_engine(spec)
    from lmaas.runtimes.catalog import create_runner as create_catalog_runner

    return create_catalog_runner(spec)


def engine_config(spec: WorkerSpec) -> EngineConfig:
    """Scheduler limits from the spec's serving options (validated by SchedulerConfig)."""
    options = spec.options
    try:
        scheduler = SchedulerConfig(
            max_num_seqs=int(options.get("max_num_seqs", spec.max_batch_size)),
            max_num_batched_tokens=int(options.get("max_num_batched_tokens", 2048)),
            max_waiting=int(options.get("max_waiting", 256)),
            block_size=int(options.get("block_size", 16)),
            enable_prefix_caching=options.get("prefix_caching", "true") == "true",
        )
    except ValueError as exc:
        raise ModelLoadError(f"invalid serving options: {exc}") from exc
    budget = options.get("kv_cache_bytes")
    return EngineConfig(scheduler=scheduler, kv_cache_bytes=int(budget) if budget else None)


def _llm_engine(spec: WorkerSpec) -> LLMEngine:
    from lmaas.runtimes.llm.hf_prompt import HFPromptProcessor
    from lmaas.runtimes.llm.paged.runner import PagedModelRunner

    def make_prompts(info: ModelInfo) -> PromptProcessor:
        return HFPromptProcessor(spec, vocab_size=info.vocab_size or 0)

    def make_guides(processor: PromptProcessor) -> GuideFactory:
        from lmaas.runtimes.llm.guided import GrammarCompiler

        # The grammar library needs the Hugging Face tokenizer itself, not the protocol.
        if not isinstance(processor, HFPromptProcessor):
            raise ModelLoadError("guided decoding needs the Hugging Face prompt processor")
        return GrammarCompiler(
            processor.tokenizer,
            eos_token_ids=processor.eos_token_ids,
            vocab_size=processor.vocab_size,
        )

    return LLMEngine(PagedModelRunner(spec), make_prompts, engine_config(spec), make_guides)


def _custom_runner(target: str, spec: WorkerSpec) -> Runner:
    """Build a runner from ``module:factory``: bring-your-own runners (and test fakes)."""
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"runner {target!r} cannot be imported: {exc}") from exc
    runner: Runner = factory(spec)
    return runner
