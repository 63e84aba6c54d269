"""Open Inference Protocol v2 (KServe / Triton) routes."""
