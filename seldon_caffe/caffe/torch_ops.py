"""The ONNX ops our Caffe converter writes, each as torch calls recorded in a torch.fx graph.

`to_torch.py` walks the ONNX graph and calls `OPS[node.op](builder, node)` for each node. The
builder holds every value by its ONNX name: an fx proxy for a tensor computed at run time, a
numpy array for a graph constant (shapes, axes and indices are read from those while building,
so nothing in the graph depends on data), a `ShapeOf` for Shape(x). Constants that tensors
need become module buffers, so `.to(device / dtype)` moves them with the weights.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import numpy_helper

from .io import CaffeFormatError

# ONNX TensorProto data types this graph casts to.
_CAST = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}


class UnsupportedOp(CaffeFormatError):
    """An ONNX node this builder cannot express in torch: the message names it."""


@dataclass(frozen=True)
class Node:
    """One ONNX node, its attributes decoded."""

    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    name: str


@dataclass(frozen=True)
class ShapeOf:
    """Shape(x) (+ a constant): kept symbolic, read one axis at a time."""

    source: Any
    offset: tuple[int, ...] = ()

    def item(self, i: int) -> Any:
        return self.source.size(i) + (self.offset[i] if self.offset else 0)


# -- the builder --------------------------------------------------------------------------


class TorchBuilder:
    """Values by ONNX name (fx proxies, numpy constants, ShapeOf) and the graph being built."""

    def __init__(self, torch: Any, constants: dict[str, np.ndarray], shapes: dict[str, list[int | None]]) -> None:
        import torch.fx

        self.torch = torch
        self.F = torch.nn.functional
        self.graph = torch.fx.Graph()
        self.tracer = torch.fx.proxy.GraphAppendingTracer(self.graph)
        self.root = torch.nn.Module()
        self.values: dict[str, Any] = dict(constants)
        self.shapes = shapes
        self._buffers: dict[str, Any] = {}

    def input(self, name: str) -> None:
        identifier = re.sub(r"\W", "_", name)
        identifier = f"input_{identifier}" if not identifier or identifier[0].isdigit() else identifier
        self.values[name] = self.torch.fx.Proxy(self.graph.placeholder(identifier), self.tracer)

    def tensor(self, name: str) -> Any:
        """The value as something torch ops take: a proxy (constants become module buffers)."""
        value = self.values[name]
        if not isinstance(value, np.ndarray):
            return value
        if name not in self._buffers:
            attr = f"c{len(self._buffers)}"
            self.root.register_buffer(attr, self.torch.from_numpy(np.array(value)))  # a writable copy
            self._buffers[name] = self.torch.fx.Proxy(self.graph.get_attr(attr), self.tracer)
        return self._buffers[name]

    def operand(self, name: str) -> Any:
        """A tensor, or a Python number for a 0-d float constant (it follows the model's dtype)."""
        value = self.values[name]
        if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.floating):
            return float(value)
        return self.tensor(name)

    def ints(self, name: str) -> list[int]:
        value = self.values.get(name)
        if not isinstance(value, np.ndarray):
            raise UnsupportedOp(
                f"ONNX value {name!r} must be a constant (shapes, axes and indices are read at build time)"
            )
        return [int(v) for v in value.reshape(-1)]

    def rank(self, name: str, node: Node) -> int:
        if name not in self.shapes:
            raise UnsupportedOp(f"ONNX node {node.name!r} ({node.op}): the rank of {name!r} is unknown")
        return len(self.shapes[name])


Op = Callable[[TorchBuilder, Node], Any]
OPS: dict[str, Op] = {}


def op(*names: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def _binary(function: Callable[[Any, Any], Any]) -> Op:
    def apply(b: TorchBuilder, n: Node) -> Any:
        left, right = (b.values[name] for name in n.inputs)
        if isinstance(left, ShapeOf) and isinstance(right, np.ndarray) and function is operator.add:
            offset = left.offset or (0,) * right.size
            return ShapeOf(left.source, tuple(o + int(r) for o, r in zip(offset, right.reshape(-1), strict=True)))
        return function(b.operand(n.inputs[0]), b.operand(n.inputs[1]))

    return apply


for _name, _function in {
    "Add": operator.add,
    "Sub": operator.sub,
    "Mul": operator.mul,
    "Div": operator.truediv,
}.items():
    OPS[_name] = _binary(_function)


@op("Pow")
def _pow(b: TorchBuilder, n: Node) -> Any:
    return b.torch.pow(b.operand(n.inputs[0]), b.operand(n.inputs[1]))


@op("Mod")
def _mod(b: TorchBuilder, n: Node) -> Any:
    fn = b.torch.fmod if n.attrs.get("fmod", 0) else b.torch.remainder
    return fn(b.tensor(n.inputs[0]), b.operand(n.inputs[1]))


@op("Greater")
def _greater(b: TorchBuilder, n: Node) -> Any:
    return b.torch.gt(b.tensor(n.inputs[0]), b.operand(n.inputs[1]))


@op("Where")
def _where(b: TorchBuilder, n: Node) -> Any:
    return b.torch.where(b.tensor(n.inputs[0]), *(b.operand(name) for name in n.inputs[1:]))


@op("Max")
def _max(b: TorchBuilder, n: Node) -> Any:
    result = b.tensor(n.inputs[0])
    for name in n.inputs[1:]:
        result = b.torch.maximum(result, b.tensor(name))
    return result


_UNARY = {
    "Abs": "abs",
    "Exp": "exp",
    "Log": "log",
    "Sqrt": "sqrt",
    "Relu": "relu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
}


@op(*_UNARY)
def _unary(b: TorchBuilder, n: Node) -> Any:
    return getattr(b.torch, _UNARY[n.op])(b.tensor(n.inputs[0]))


@op("Identity")
def _identity(b: TorchBuilder, n: Node) -> Any:
    return b.values[n.inputs[0]]


@op("Softplus")
def _softplus(b: TorchBuilder, n: Node) -> Any:
    return b.F.softplus(b.tensor(n.inputs[0]))


@op("LeakyRelu")
def _leaky_relu(b: TorchBuilder, n: Node) -> Any:
    return b.F.leaky_relu(b.tensor(n.inputs[0]), n.attrs.get("alpha", 0.01))


@op("Elu")
def _elu(b: TorchBuilder, n: Node) -> Any:
    return b.F.elu(b.tensor(n.inputs[0]), n.attrs.get("alpha", 1.0))


@op("PRelu")
def _prelu(b: TorchBuilder, n: Node) -> Any:
    x = b.tensor(n.inputs[0])
    return b.torch.where(x < 0, x * b.tensor(n.inputs[1]), x)


@op("Clip")
def _clip(b: TorchBuilder, n: Node) -> Any:
    low, high = (float(b.values[name].reshape(-1)[0]) if name else None for name in [*n.inputs[1:], "", ""][:2])
    return b.torch.clamp(b.tensor(n.inputs[0]), low, high)


@op("Softmax")
def _softmax(b: TorchBuilder, n: Node) -> Any:
    return b.torch.softmax(b.tensor(n.inputs[0]), n.attrs.get("axis", -1))


@op("Cast")
def _cast(b: TorchBuilder, n: Node) -> Any:
    to = n.attrs["to"]
    if to not in _CAST:
        raise UnsupportedOp(f"ONNX node {n.name!r}: Cast to data type {to}")
    return b.tensor(n.inputs[0]).to(getattr(b.torch, _CAST[to]))


@op("Constant")
def _constant(b: TorchBuilder, n: Node) -> Any:
    b.values[n.outputs[0]] = numpy_helper.to_array(n.attrs["value"])
    return b.tensor(n.outputs[0])


@op("Shape")
def _shape(b: TorchBuilder, n: Node) -> Any:
    return ShapeOf(b.tensor(n.inputs[0]))


@op("ConstantOfShape")
def _constant_of_shape(b: TorchBuilder, n: Node) -> Any:
    shape = b.values[n.inputs[0]]
    if not isinstance(shape, ShapeOf) or shape.offset:
        raise UnsupportedOp(f"ONNX node {n.name!r}: ConstantOfShape of anything but another value's shape")
    value = numpy_helper.to_array(n.attrs["value"]).reshape(-1)[0] if "value" in n.attrs else 0.0
    return b.torch.full_like(shape.source, float(value))


# -- neural-net ops -------------------------------------------------------------------------


@op("Conv", "ConvTranspose")
def _conv(b: TorchBuilder, n: Node) -> Any:
    x, weight = b.tensor(n.inputs[0]), b.tensor(n.inputs[1])
    bias = b.tensor(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else None
    spatial = len(b.values[n.inputs[1]].shape) - 2
    pads = n.attrs.get("pads", [0] * 2 * spatial)
    begin, end = pads[:spatial], pads[spatial:]
    x, padding = (x, begin) if begin == end else (b.F.pad(x, _torch_pads(begin, end)), [0] * spatial)
    kwargs = dict(
        stride=n.attrs.get("strides", [1] * spatial),
        dilation=n.attrs.get("dilations", [1] * spatial),
        groups=n.attrs.get("group", 1),
    )
    if n.op == "Conv":
        return getattr(b.F, f"conv{spatial}d")(x, weight, bias, padding=padding, **kwargs)
    if any(n.attrs.get("output_padding", [])) or "output_shape" in n.attrs:
        raise UnsupportedOp(f"ONNX node {n.name!r}: ConvTranspose with output_padding or output_shape")
    return getattr(b.F, f"conv_transpose{spatial}d")(x, weight, bias, padding=padding, **kwargs)


def _ceil_mode_output(size: int, kernel: int, stride: int, pad: int) -> int:
    """torch's (and Caffe's) ceil-mode pooled size, the last window dropped if it starts in the end padding."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    return out - 1 if (out - 1) * stride >= size + pad else out


@op("MaxPool", "AveragePool")
def _pool(b: TorchBuilder, n: Node) -> Any:
    x = b.tensor(n.inputs[0])
    kernel, spatial = n.attrs["kernel_shape"], len(n.attrs["kernel_shape"])
    strides, pads = n.attrs.get("strides", [1] * spatial), n.attrs.get("pads", [0] * 2 * spatial)
    if n.attrs.get("ceil_mode", 0) or any(d != 1 for d in n.attrs.get("dilations", [1])):
        raise UnsupportedOp(f"ONNX node {n.name!r}: {n.op} with ceil_mode or dilations")
    begin, end, fill = pads[:spatial], pads[spatial:], float("-inf") if n.op == "MaxPool" else 0.0
    fits = all(p <= k // 2 for p, k in zip(begin, kernel, strict=True))  # torch's limit on its own padding
    # Caffe's end padding gives the same windows as torch's ceil mode when that lands on the
    # same size: a max over a window cut at the edge equals one over -inf padding.
    ceil_mode = n.op == "MaxPool" and begin != end and fits and _ceil_mode_matches(b, n, kernel, strides)
    if ceil_mode or (begin == end and fits):
        padding = begin
    else:
        x, padding = b.F.pad(x, _torch_pads(begin, end), value=fill), [0] * spatial
    if n.op == "AveragePool":
        if not n.attrs.get("count_include_pad", 0) and any(pads):
            raise UnsupportedOp(f"ONNX node {n.name!r}: AveragePool excluding padding")
        return getattr(b.F, f"avg_pool{spatial}d")(x, kernel, strides, padding, count_include_pad=True)
    indices = len(n.outputs) > 1 and bool(n.outputs[1])
    if indices and not (ceil_mode or (begin == end and fits)):
        raise UnsupportedOp(f"ONNX node {n.name!r}: MaxPool indices with padding torch cannot take")
    result = getattr(b.F, f"max_pool{spatial}d")(
        x, kernel, strides, padding, ceil_mode=ceil_mode, return_indices=indices
    )
    return (result[0], result[1]) if indices else result


def _ceil_mode_matches(b: TorchBuilder, n: Node, kernel: Sequence[int], strides: Sequence[int]) -> bool:
    dims = b.shapes.get(n.inputs[0], [])[2:]
    sizes = [s for s in dims if isinstance(s, int)]
    if len(sizes) != len(kernel) or len(sizes) != len(dims):
        return False
    pads = n.attrs["pads"]
    begin, end = pads[: len(kernel)], pads[len(kernel) :]
    return all(
        _ceil_mode_output(s, k, st, p) == (s + p + e - k) // st + 1
        for s, k, st, p, e in zip(sizes, kernel, strides, begin, end, strict=True)
    )


def _torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX's (all begins, all ends) as F.pad's (last axis first, begin and end per axis)."""
    return [p for axis in reversed(range(len(begin))) for p in (begin[axis], end[axis])]


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(b: TorchBuilder, n: Node) -> Any:
    x, dims = b.tensor(n.inputs[0]), list(range(2, b.rank(n.inputs[0], n)))
    if n.op == "GlobalMaxPool":
        return b.torch.amax(x, dims, keepdim=True)
    return b.torch.mean(x, dims, keepdim=True)


@op("LRN")
def _lrn(b: TorchBuilder, n: Node) -> Any:
    """x / (bias + alpha / size * sum of squares over `size` channels) ^ beta, written with a 2-D
    average pool (F.local_response_norm's 3-D pool has no bf16 kernel on CPU)."""
    x, size = b.tensor(n.inputs[0]), n.attrs["size"]
    if size % 2 == 0:
        raise UnsupportedOp(f"ONNX node {n.name!r}: LRN of even size (Caffe allows odd sizes only)")
    wide = x.float()  # squares of fp16 activations past 256 would overflow (no-op in fp32)
    squares = (wide * wide).flatten(2).unsqueeze(1)  # N, 1, C, H*W: pool along C
    mean = b.F.avg_pool2d(squares, (size, 1), 1, (size // 2, 0), count_include_pad=True).reshape_as(x)
    scale = (mean * n.attrs.get("alpha", 1e-4) + n.attrs.get("bias", 1.0)) ** n.attrs.get("beta", 0.75)
    return (wide / scale).to(x.dtype)


@op("BatchNormalization")
def _batch_norm(b: TorchBuilder, n: Node) -> Any:
    x, scale, bias, mean, var = (b.tensor(name) for name in n.inputs[:5])
    return b.F.batch_norm(x, mean, var, scale, bias, False, 0.0, n.attrs.get("epsilon", 1e-5))


@op("Gemm")
def _gemm(b: TorchBuilder, n: Node) -> Any:
    a, w = b.tensor(n.inputs[0]), b.tensor(n.inputs[1])
    c = b.tensor(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else None
    alpha, beta = n.attrs.get("alpha", 1.0), n.attrs.get("beta", 1.0)
    if n.attrs.get("transA", 0):
        a = a.t()
    if n.attrs.get("transB", 0) and alpha == 1.0 and beta == 1.0:
        return b.F.linear(a, w, c)  # InnerProduct: one fused kernel
    product = b.torch.matmul(a, w.t() if n.attrs.get("transB", 0) else w)
    product = product * alpha if alpha != 1.0 else product
    return product if c is None else product + (c * beta if beta != 1.0 else c)


@op("MatMul")
def _matmul(b: TorchBuilder, n: Node) -> Any:
    return b.torch.matmul(b.tensor(n.inputs[0]), b.tensor(n.inputs[1]))


# -- shape ops ----------------------------------------------------------------------------


@op("Flatten")
def _flatten(b: TorchBuilder, n: Node) -> Any:
    x, axis = b.tensor(n.inputs[0]), n.attrs.get("axis", 1)
    if axis < 0:
        axis += b.rank(n.inputs[0], n)
    if axis == 0:
        return x.reshape(1, -1)
    return x.flatten(0, axis - 1).flatten(1)


@op("Reshape")
def _reshape(b: TorchBuilder, n: Node) -> Any:
    x, shape = b.tensor(n.inputs[0]), b.ints(n.inputs[1])
    if n.attrs.get("allowzero", 0) and 0 in shape:
        raise UnsupportedOp(f"ONNX node {n.name!r}: Reshape with allowzero")
    return x.reshape(*[x.size(i) if d == 0 else d for i, d in enumerate(shape)])


@op("Concat")
def _concat(b: TorchBuilder, n: Node) -> Any:
    return b.torch.cat([b.tensor(name) for name in n.inputs], n.attrs["axis"])


@op("Split")
def _split(b: TorchBuilder, n: Node) -> Any:
    sizes = b.ints(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] else n.attrs.get("split")
    if sizes is None:
        raise UnsupportedOp(f"ONNX node {n.name!r}: Split without sizes")
    parts = b.torch.split(b.tensor(n.inputs[0]), list(sizes), n.attrs.get("axis", 0))
    return tuple(parts[i] for i in range(len(n.outputs)))


@op("Slice")
def _slice(b: TorchBuilder, n: Node) -> Any:
    x, starts = b.tensor(n.inputs[0]), b.ints(n.inputs[1])
    ends_value = b.values[n.inputs[2]]
    ends = [ends_value.item(i) for i in range(len(starts))] if isinstance(ends_value, ShapeOf) else b.ints(n.inputs[2])
    axes = b.ints(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] else list(range(len(starts)))
    steps = b.ints(n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] else [1] * len(starts)
    if any(a < 0 for a in axes) or any(s != 1 for s in steps):
        raise UnsupportedOp(f"ONNX node {n.name!r}: Slice with negative axes or steps other than 1")
    index = [slice(None)] * (max(axes) + 1)
    for axis, start, end in zip(axes, starts, ends, strict=True):
        index[axis] = slice(start, end)
    return x[tuple(index)]


@op("Tile")
def _tile(b: TorchBuilder, n: Node) -> Any:
    return b.tensor(n.inputs[0]).repeat(*b.ints(n.inputs[1]))


@op("Gather")
def _gather(b: TorchBuilder, n: Node) -> Any:
    if n.attrs.get("axis", 0) != 0:
        raise UnsupportedOp(f"ONNX node {n.name!r}: Gather on an axis other than 0")
    return b.tensor(n.inputs[0])[b.tensor(n.inputs[1])]


@op("Unsqueeze")
def _unsqueeze(b: TorchBuilder, n: Node) -> Any:
    x = b.tensor(n.inputs[0])
    axes = b.ints(n.inputs[1]) if len(n.inputs) > 1 else list(n.attrs["axes"])
    if any(a < 0 for a in axes):
        raise UnsupportedOp(f"ONNX node {n.name!r}: Unsqueeze with negative axes")
    for axis in sorted(axes):
        x = x.unsqueeze(axis)
    return x


_REDUCE = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceSumSquare": "sum"}


@op(*_REDUCE)
def _reduce(b: TorchBuilder, n: Node) -> Any:
    x = b.tensor(n.inputs[0])
    axes = b.ints(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] else n.attrs.get("axes")
    if axes is None:
        axes = list(range(b.rank(n.inputs[0], n)))
    if n.op == "ReduceSumSquare":
        x = x * x
    return getattr(b.torch, _REDUCE[n.op])(x, list(axes), keepdim=bool(n.attrs.get("keepdims", 1)))


@op("ArgMax")
def _argmax(b: TorchBuilder, n: Node) -> Any:
    x, axis, keep = b.tensor(n.inputs[0]), n.attrs.get("axis", 0), bool(n.attrs.get("keepdims", 1))
    if not n.attrs.get("select_last_index", 0):
        return b.torch.argmax(x, axis, keepdim=keep)
    # torch returns the first of equal maxima; ONNX's select_last_index wants the last.
    return (x.size(axis) - 1) - b.torch.argmax(x.flip(axis), axis, keepdim=keep)


@op("TopK")
def _topk(b: TorchBuilder, n: Node) -> Any:
    (k,) = b.ints(n.inputs[1])
    largest, ordered = bool(n.attrs.get("largest", 1)), bool(n.attrs.get("sorted", 1))
    result = b.torch.topk(b.tensor(n.inputs[0]), k, n.attrs.get("axis", -1), largest, ordered)
    return result[0], result[1]
