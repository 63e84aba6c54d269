"""lmaas.cluster."""
