"""Our own decoder implementations over the paged KV cache (no transformers in the hot path)."""
