"""Admin routes (``/admin/*``): every one needs a key with the ``admin`` scope."""
