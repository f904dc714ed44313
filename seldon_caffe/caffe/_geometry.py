"""Shared geometry of Caffe layers: axis rules, (de)convolution settings, Scale/Bias operands.

Shape inference (`shapes.py`) and parameter-shape checks (`params.py`) both need these; they
live here once so the two can never disagree about, say, how a convolution's pad is read.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import Message

from . import caffe_pb2

Shape = tuple[int, ...]


class LayerError(Exception):
    """A layer's settings do not fit its inputs; callers add the layer's name and type."""


def canonical_axis(axis: int, ndim: int, what: str = "axis") -> int:
    """Caffe's CanonicalAxisIndex: -ndim <= axis < ndim, negatives count from the end."""
    if not -ndim <= axis < ndim:
        raise LayerError(f"{what} {axis} is out of range for a {ndim}-D input")
    return axis % ndim


def one_bottom(bottoms: list[Shape]) -> Shape:
    """The single input of a one-input layer (most layers), or a complaint."""
    if len(bottoms) != 1:
        raise LayerError(f"takes one bottom, got {len(bottoms)}")
    return bottoms[0]


def per_axis(values: Sequence[int], n: int, default: int, what: str) -> list[int]:
    """Caffe's repeated geometry fields: none -> default, one -> every axis, else one per axis."""
    if not values:
        return [default] * n
    if len(values) == 1:
        return [values[0]] * n
    if len(values) != n:
        raise LayerError(f"{what} has {len(values)} values for {n} spatial axes")
    return list(values)


def _pair(param: Message, field: str, n: int, values: Sequence[int]) -> list[int] | None:
    """The 2-D `field_h` / `field_w` alternative, when set; it excludes the repeated form."""
    if not (param.HasField(f"{field}_h") or param.HasField(f"{field}_w")):
        return None
    if n != 2:
        raise LayerError(f"{field}_h / {field}_w only work for 2-D convolution")
    if values:
        raise LayerError(f"set {field} or {field}_h / {field}_w, not both")
    return [getattr(param, f"{field}_h"), getattr(param, f"{field}_w")]


def c_div(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero), which Caffe's shape formulas rely on."""
    return -(-a // b) if a < 0 else a // b


class ConvGeometry:
    """The resolved geometry of a (de)convolution: channel axis and per-spatial-axis values."""

    def __init__(self, layer: caffe_pb2.LayerParameter, shape: Shape) -> None:
        p = layer.convolution_param
        self.axis = canonical_axis(p.axis, len(shape))
        n = len(shape) - self.axis - 1
        self.kernel = _pair(p, "kernel", n, p.kernel_size) or per_axis(p.kernel_size, n, 0, "kernel_size")
        self.stride = _pair(p, "stride", n, p.stride) or per_axis(p.stride, n, 1, "stride")
        self.pad = _pair(p, "pad", n, p.pad) or per_axis(p.pad, n, 0, "pad")
        self.dilation = per_axis(p.dilation, n, 1, "dilation")
        if not all(self.kernel) or not all(self.stride) or not all(self.dilation):
            raise LayerError("kernel size, stride and dilation must be positive")
        self.channels = shape[self.axis]
        self.num_output, self.group = p.num_output, p.group
        if self.num_output <= 0 or self.group <= 0:
            raise LayerError("num_output and group must be positive")
        if self.channels % self.group or self.num_output % self.group:
            raise LayerError(f"group {self.group} must divide the {self.channels} input and {self.num_output} outputs")


def same_shapes(bottoms: list[Shape]) -> None:
    """Element-wise layers (and multi-input convolutions) need inputs of one shape."""
    if any(b != bottoms[0] for b in bottoms):
        raise LayerError(f"needs bottoms of one shape, got {[list(b) for b in bottoms]}")


def operand_shape(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> Shape:
    """The shape of a Scale / Bias operand: its second bottom, or its learned parameter."""
    p = layer.scale_param if layer.type == "Scale" else layer.bias_param
    shape = bottoms[0]
    if len(bottoms) == 2:
        operand = bottoms[1]
        axis = 0 if not operand else canonical_axis(p.axis, len(shape))
        if shape[axis : axis + len(operand)] != operand:
            raise LayerError(f"second bottom {list(operand)} does not match input {list(shape)} at axis {axis}")
        return operand
    axis = canonical_axis(p.axis, len(shape))
    if p.num_axes < -1 or axis + p.num_axes > len(shape):
        raise LayerError(f"num_axes {p.num_axes} does not fit input {list(shape)} from axis {axis}")
    return shape[axis:] if p.num_axes == -1 else shape[axis : axis + p.num_axes]


def legacy_axis(param: caffe_pb2.ConcatParameter | caffe_pb2.SliceParameter, legacy: str, ndim: int) -> int:
    """Concat's concat_dim / Slice's slice_dim win over `axis` when set (never negative)."""
    if param.HasField(legacy):
        if param.HasField("axis"):
            raise LayerError(f"set axis or {legacy}, not both")
        return canonical_axis(getattr(param, legacy), ndim, legacy)
    return canonical_axis(param.axis, ndim)
