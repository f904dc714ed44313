"""torch forms of the ONNX ops that only the other forks' converters write (see torch_ops.py)."""

from __future__ import annotations

from .torch_ops import Node, TorchBuilder, op  # noqa: F401
