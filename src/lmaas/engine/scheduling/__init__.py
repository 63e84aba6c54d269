"""Dynamic batching for the non-generative tasks (embeddings, rerank, classification, ...)."""

from lmaas.engine.scheduling.batcher import BatcherConfig, DynamicBatcher, QueuedRow

__all__ = ["BatcherConfig", "DynamicBatcher", "QueuedRow"]
