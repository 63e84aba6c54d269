"""Rerank runners (cross-encoders scoring query-document pairs)."""
