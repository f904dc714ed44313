"""ONNX converters for caffe-ssd's layers: Normalize, Permute, PriorBox, DetectionOutput."""

from __future__ import annotations

from .onnx_graph import LayerView, converts  # noqa: F401
