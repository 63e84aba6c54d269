"""The LLM engine: continuous batching over a paged KV cache (plain Python, no torch)."""
