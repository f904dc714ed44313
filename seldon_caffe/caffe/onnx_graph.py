"""The ONNX graph a Caffe net becomes, and the registry of per-layer converters.

The converter modules (`onnx_nn.py`, `onnx_math.py`, `onnx_shape.py`) each register
functions with `@converts("Type", ...)`; a function receives a `LayerView` (the layer, the
ONNX names of its inputs, the names it must write, shapes and weights) and adds nodes to
the `GraphBuilder`. Everything that depends on the opset (axes as attributes or as inputs)
lives in the builder, so a converter never has to know which opset it writes.

Names are the crux: ONNX values are written once, Caffe blobs are overwritten in place
(`relu1` writes `conv1`). The driver gives each layer output the Caffe top name only when
that layer is the blob's last writer, so the value a user asks for by its Caffe name is
always the final one; earlier versions get unique names (`conv1@conv1`). The builder
reserves every Caffe blob name up front, so no helper value can ever take one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import caffe_pb2
from ._geometry import Shape
from .io import CaffeFormatError

MIN_OPSET = 13  # Softmax over one axis, and axes as inputs for Split / Squeeze / ReduceSum
DEFAULT_OPSET = 17


class UnsupportedLayer(CaffeFormatError):
    """A layer the ONNX converter cannot express: the message names the layer and its type."""


class GraphBuilder:
    """Collects nodes and initializers, hands out unique names, and knows the opset's forms."""

    def __init__(self, opset: int, reserved: Iterable[str] = ()) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken: set[str] = set(reserved)
        self._consts: dict[tuple[str, tuple[int, ...], str], str] = {}

    def name(self, hint: str) -> str:
        """`hint` itself if still free, else `hint_2`, `hint_3`, ... (never a Caffe blob name)."""
        candidate, n = hint, 1
        while candidate in self._taken:
            n += 1
            candidate = f"{hint}_{n}"
        self._taken.add(candidate)
        return candidate

    def const(self, value: np.ndarray | float | Sequence[float], hint: str, dtype: type = np.float32) -> str:
        """An initializer holding `value`; identical arrays (shared Caffe params) are stored once."""
        array: np.ndarray = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        key = (array.dtype.str, array.shape, hashlib.sha1(array.tobytes()).hexdigest())
        if key not in self._consts:
            name = self.name(hint)
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Sequence[int], hint: str) -> str:
        """An int64 initializer (shapes, axes, indices)."""
        return self.const(np.asarray(values, dtype=np.int64), hint, np.int64)

    def node(
        self, op: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, *, hint: str, **attrs: Any
    ) -> list[str]:
        """Add one node; `outputs` is names, or a count of fresh names derived from `hint`."""
        if isinstance(outputs, int):
            outputs = [self.name(f"{hint}/{op}" + (f":{i}" if i else "")) for i in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=self.name(f"{hint}/{op}"), **attrs))
        return list(outputs)

    def op(self, op: str, inputs: Sequence[str], output: str | None = None, *, hint: str, **attrs: Any) -> str:
        """A one-output node; returns its output name."""
        return self.node(op, inputs, [output] if output else 1, hint=hint, **attrs)[0]

    # -- forms that changed between opsets ---------------------------------------------

    def reduce(
        self, op: str, x: str, axes: Sequence[int], output: str | None = None, *, keepdims: bool, hint: str
    ) -> str:
        """Reduce* over `axes`: an attribute before opset 18 (ReduceSum: 13), an input since."""
        axes_as_input = self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13)
        if axes_as_input:
            return self.op(op, [x, self.ints(axes, "axes")], output, hint=hint, keepdims=int(keepdims))
        return self.op(op, [x], output, hint=hint, axes=list(axes), keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int], *, hint: str) -> str:
        return self.op("Unsqueeze", [x, self.ints(axes, "axes")], hint=hint)

    def reshape(self, x: str, shape: Sequence[int], output: str | None = None, *, hint: str) -> str:
        """ONNX Reshape: 0 copies the input's dimension at the same index, -1 is inferred."""
        return self.op("Reshape", [x, self.ints(shape, "shape")], output, hint=hint)

    def scaled(self, x: str, scale: float, shift: float = 0.0, *, hint: str) -> str:
        """shift + scale * x, leaving out a multiplication by 1 and an addition of 0."""
        if scale != 1.0:
            x = self.op("Mul", [x, self.const(scale, "scale")], hint=hint)
        if shift != 0.0:
            x = self.op("Add", [x, self.const(shift, "shift")], hint=hint)
        return x


@dataclass
class LayerView:
    """What a converter sees of one Caffe layer while it is being converted."""

    param: caffe_pb2.LayerParameter
    g: GraphBuilder
    inputs: list[str]  # ONNX names of the bottoms' current values
    outputs: list[str]  # the names the converter must write, one per top
    bottom_shapes: list[Shape]
    top_shapes: list[Shape]
    blobs: list[np.ndarray] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.param.name

    def unsupported(self, why: str) -> UnsupportedLayer:
        return UnsupportedLayer(f"layer {self.param.name!r} ({self.param.type}): cannot convert to ONNX: {why}")

    def weight(self, index: int, role: str, shape: Sequence[int] | None = None) -> str:
        """Initializer for learned blob `index`, optionally reshaped (e.g. for broadcasting)."""
        array = self.blobs[index] if shape is None else self.blobs[index].reshape(shape)
        return self.g.const(array, f"{self.name}/{role}")

    def emit(self, op: str, inputs: Sequence[str], index: int = 0, **attrs: Any) -> str:
        """A node writing top `index` (the value users address by the Caffe name)."""
        return self.g.op(op, inputs, self.outputs[index], hint=self.name, **attrs)

    def tmp(self, op: str, inputs: Sequence[str], **attrs: Any) -> str:
        """A helper node whose output only this layer uses."""
        return self.g.op(op, inputs, hint=self.name, **attrs)


Converter = Callable[[LayerView], None]
CONVERTERS: dict[str, Converter] = {}


def converts(*types: str) -> Callable[[Converter], Converter]:
    """Register a converter for the given Caffe layer types."""

    def register(fn: Converter) -> Converter:
        for name in types:
            CONVERTERS[name] = fn
        return fn

    return register


def value_dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """A graph value's dims: numbers, None where symbolic or unknown (the inverse of value_info)."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def value_info(name: str, dims: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    """A float32 graph input/output; a str dim is symbolic (the batch), None unknown."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))
