"""lmaas.lifecycle."""
