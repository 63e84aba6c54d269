"""lmaas.core."""
