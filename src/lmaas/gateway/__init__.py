"""lmaas.gateway."""
