"""lmaas.engine."""
