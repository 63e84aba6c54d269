"""lmaas.api."""
