"""OpenAI-compatible routes, one module per endpoint."""
