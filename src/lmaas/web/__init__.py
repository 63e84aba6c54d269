"""lmaas.web."""
