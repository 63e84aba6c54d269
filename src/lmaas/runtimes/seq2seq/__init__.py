"""Encoder-decoder text generation (translation, summarisation)."""
