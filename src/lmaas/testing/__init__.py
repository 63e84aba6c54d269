"""lmaas.testing."""
