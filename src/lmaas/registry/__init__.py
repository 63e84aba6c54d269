"""lmaas.registry."""
