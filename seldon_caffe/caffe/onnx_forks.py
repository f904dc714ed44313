"""ONNX converters for the other forks' layers: ROIPooling, BN, Upsample, Interp,
ShuffleChannel, ReLU6, ConvolutionDepthwise."""

from __future__ import annotations

from .onnx_graph import LayerView, converts  # noqa: F401
