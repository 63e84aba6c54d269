"""Runners for generic tensor models (any ONNX graph on v2 tensors)."""
