"""Embedding runners (sentence-transformers style encoders)."""
