"""lmaas.observability."""
