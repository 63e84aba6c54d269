"""Text generation runners (decoder-only LMs)."""
