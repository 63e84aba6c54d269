"""lmaas.bootstrap."""
