"""lmaas.runtimes."""
