"""The paged-KV torch model runner of the LLM engine (see :mod:`.runner`)."""

from lmaas.runtimes.llm.paged.runner import PagedModelRunner, SlotSampler

__all__ = ["PagedModelRunner", "SlotSampler"]
