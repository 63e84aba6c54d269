"""lmaas.cli."""
