"""Caffe's output-shape rules, so a net's signature is known without running it.

Each rule restates what the layer's Reshape() does in Caffe 1.0, including its quirks
(pooling rounds up and then drops a window that would start in the padding; Reshape copies
0s and infers one -1; the legacy concat_dim / slice_dim). The test suite checks them
against real Caffe blob by blob. A layer type without a rule is a CaffeFormatError naming
the layer: a server must refuse at start-up a net it cannot describe.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise

from . import caffe_pb2
from ._geometry import (
    ConvGeometry,
    LayerError,
    Shape,
    c_div,
    canonical_axis,
    legacy_axis,
    one_bottom,
    operand_shape,
    per_axis,
    same_shapes,
)
from .forks import FORK_SHAPE_RULES
from .io import CaffeFormatError
from .tolerant import WAYS_FORWARD
from .upgrade import upgrade_net


class UnsupportedLayerType(CaffeFormatError):
    """A layer type no rule here knows (neither BVLC's nor a fork's): no input size helps."""


_Rule = Callable[[caffe_pb2.LayerParameter, list[Shape]], list[Shape]]
_RULES: dict[str, _Rule] = {}


def _rule(*types: str) -> Callable[[_Rule], _Rule]:
    def register(fn: _Rule) -> _Rule:
        for name in types:
            _RULES[name] = fn
        return fn

    return register


def infer_shapes(
    net: caffe_pb2.NetParameter, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Shape]:
    """{blob name: shape} for every blob of `net`, in the order blobs first appear.

    `input_shapes` replaces the declared shape of Input tops (e.g. another batch size).
    In-place layers keep a blob's shape, so each name has one final shape, as in Caffe.
    """
    if net.layers or net.input:
        net = upgrade_net(net)
    overrides = {name: tuple(int(d) for d in dims) for name, dims in (input_shapes or {}).items()}
    shapes: dict[str, Shape] = {}
    inputs: list[str] = []
    for layer in net.layer:
        where = f"layer {layer.name!r} ({layer.type})"
        if layer.type not in SUPPORTED_LAYERS:
            raise UnsupportedLayerType(f"{where}: unsupported layer type {layer.type!r}{_hint(layer.type)}")
        missing = [b for b in layer.bottom if b not in shapes]
        if missing:
            raise CaffeFormatError(f"{where} reads blob {missing[0]!r}, which no earlier layer produces")
        bottoms = [shapes[b] for b in layer.bottom]
        try:
            tops = _input(layer, overrides) if layer.type == "Input" else _RULES[layer.type](layer, bottoms)
            if len(tops) != len(layer.top):
                raise LayerError(f"has {len(layer.top)} top(s) but produces {len(tops)}")
            for shape in tops:
                if any(d < 0 for d in shape):
                    raise LayerError(f"would produce a blob of negative size {list(shape)}")
        except LayerError as exc:
            raise CaffeFormatError(f"{where}: {exc}") from None
        for index, (name, shape) in enumerate(zip(layer.top, tops, strict=True)):
            in_place = index < len(layer.bottom) and layer.bottom[index] == name
            if name in shapes and not in_place:
                raise CaffeFormatError(f"{where}: top blob {name!r} is produced twice (only in-place reuse is allowed)")
            shapes[name] = shape
        if layer.type == "Input":
            inputs.extend(layer.top)
    unknown = sorted(set(overrides) - set(inputs))
    if unknown:
        raise CaffeFormatError(f"no input named {unknown[0]!r}; the net's inputs are {', '.join(inputs) or 'none'}")
    return shapes


_TRAINING_LAYERS = ("Data", "ImageData", "HDF5Data", "WindowData", "Accuracy", "Loss")


def _hint(layer_type: str) -> str:
    """What to do about an unsupported type: training layers mean a train_val file was given;
    any other type gets the three ways to serve it anyway (and a near name, if it is a typo)."""
    if any(layer_type.endswith(kind) for kind in _TRAINING_LAYERS):
        return "; it is a training layer: serve the deploy prototxt, whose inputs are Input layers"
    known = {name.lower(): name for name in SUPPORTED_LAYERS}
    close = difflib.get_close_matches(layer_type.lower(), known, n=1, cutoff=0.8)
    typo = f" (a typo for {known[close[0]]!r}?)" if close else ""
    return f"{typo}; {WAYS_FORWARD}"


def _input(layer: caffe_pb2.LayerParameter, overrides: Mapping[str, Shape]) -> list[Shape]:
    declared = [tuple(s.dim) for s in layer.input_param.shape]
    if len(declared) not in (0, 1, len(layer.top)):
        raise LayerError(f"declares {len(declared)} shapes for {len(layer.top)} tops")
    tops = []
    for i, name in enumerate(layer.top):
        if name in overrides:
            tops.append(overrides[name])
        elif declared:
            tops.append(declared[0 if len(declared) == 1 else i])
        else:
            raise LayerError(f"gives no shape for input {name!r}")
    return tops


# -- rules ---------------------------------------------------------------------------


@_rule("Convolution", "Deconvolution")
def _convolution(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    if not bottoms:
        raise LayerError("takes at least one bottom")
    same_shapes(bottoms)
    shape = bottoms[0]
    g = ConvGeometry(layer, shape)
    spatial = []
    for size, k, s, p, d in zip(shape[g.axis + 1 :], g.kernel, g.stride, g.pad, g.dilation, strict=True):
        extent = d * (k - 1) + 1
        if layer.type == "Convolution":
            out = c_div(size + 2 * p - extent, s) + 1
        else:
            out = s * (size - 1) + extent - 2 * p
        if out <= 0:
            raise LayerError(f"input {list(shape)} is too small for kernel {g.kernel}, stride {g.stride}, pad {g.pad}")
        spatial.append(out)
    return [(*shape[: g.axis], g.num_output, *spatial)] * len(bottoms)


@_rule("Pooling")
def _pooling(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    p = layer.pooling_param
    shape = one_bottom(bottoms)
    if len(shape) != 4:
        raise LayerError(f"needs a 4-D input, got {list(shape)}")
    has_hw = p.HasField("kernel_h") or p.HasField("kernel_w")
    if p.global_pooling:
        if p.HasField("kernel_size") or has_hw:
            raise LayerError("global pooling takes no kernel size")
        kernel = [shape[2], shape[3]]
    elif p.HasField("kernel_size") == has_hw:
        raise LayerError("set kernel_size, or kernel_h and kernel_w")
    else:
        kernel = [p.kernel_size] * 2 if p.HasField("kernel_size") else [p.kernel_h, p.kernel_w]
    pad = [p.pad_h, p.pad_w] if p.HasField("pad_h") else [p.pad] * 2
    stride = [p.stride_h, p.stride_w] if p.HasField("stride_h") else [p.stride] * 2
    if p.global_pooling and (any(pad) or stride != [1, 1]):
        raise LayerError("global pooling needs pad 0 and stride 1")
    if not all(kernel) or not all(stride):
        raise LayerError("kernel size and stride must be positive")
    if any(pad) and (p.pool == p.STOCHASTIC or any(pd >= k for pd, k in zip(pad, kernel, strict=True))):
        raise LayerError("padding needs MAX or AVE pooling and a pad smaller than the kernel")
    rounding = math.ceil if _pools_with_ceil(p) else math.floor
    pooled = []
    for size, k, s, pd in zip(shape[2:], kernel, stride, pad, strict=True):
        out = int(rounding((size + 2 * pd - k) / s)) + 1
        if pd and (out - 1) * s >= size + pd:
            out -= 1  # the last window would start inside the padding: Caffe drops it
        if out <= 0:
            raise LayerError(f"input {list(shape)} is too small for kernel {kernel}")
        pooled.append(out)
    if len(layer.top) != 1 and not (len(layer.top) == 2 and p.pool == p.MAX):
        raise LayerError("has one top (and a mask top for MAX pooling)")
    return [(shape[0], shape[1], *pooled)] * len(layer.top)


def _pools_with_ceil(p: caffe_pb2.PoolingParameter) -> bool:
    """BVLC's round_mode (CEIL by default) or the forks' ceil_mode (PR #3057: false = FLOOR)."""
    ceil = p.round_mode == p.CEIL
    if p.HasField("ceil_mode"):
        if p.HasField("round_mode") and p.ceil_mode != ceil:
            raise LayerError("round_mode and ceil_mode disagree; set one of them")
        ceil = p.ceil_mode
    return ceil


@_rule("InnerProduct")
def _inner_product(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = one_bottom(bottoms)
    axis = canonical_axis(layer.inner_product_param.axis, len(shape))
    return [(*shape[:axis], layer.inner_product_param.num_output)]


@_rule("Embed")
def _embed(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    return [(*one_bottom(bottoms), layer.embed_param.num_output)]


_ELEMENTWISE = (
    "AbsVal BNLL BatchNorm Clip Dropout ELU Exp LRN Log MVN PReLU Power ReLU Sigmoid Swish TanH Threshold"
).split()


@_rule(*_ELEMENTWISE)
def _elementwise(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = one_bottom(bottoms)
    if layer.type == "LRN" and len(shape) != 4:
        raise LayerError(f"needs a 4-D input, got {list(shape)}")
    if layer.type == "PReLU" and len(shape) < 2:
        raise LayerError(f"needs an input with a channel axis, got {list(shape)}")
    return [shape]


@_rule("Softmax")
def _softmax(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = one_bottom(bottoms)
    canonical_axis(layer.softmax_param.axis, len(shape))
    return [shape]


@_rule("Scale", "Bias")
def _scale(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    if len(bottoms) not in (1, 2):
        raise LayerError(f"takes one or two bottoms, got {len(bottoms)}")
    operand_shape(layer, bottoms)  # validates axis / num_axes against the input
    return [bottoms[0]]


@_rule("Eltwise")
def _eltwise(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    p = layer.eltwise_param
    if len(bottoms) < 2:
        raise LayerError("takes at least two bottoms")
    if p.coeff and (p.operation == p.PROD or len(p.coeff) != len(bottoms)):
        raise LayerError("coeff needs one value per bottom, and no PROD operation")
    same_shapes(bottoms)
    return [bottoms[0]]


@_rule("Concat")
def _concat(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    if not bottoms:
        raise LayerError("takes at least one bottom")
    first = bottoms[0]
    axis = legacy_axis(layer.concat_param, "concat_dim", len(first))
    for shape in bottoms[1:]:
        if len(shape) != len(first) or shape[:axis] + shape[axis + 1 :] != first[:axis] + first[axis + 1 :]:
            raise LayerError(f"bottoms {list(first)} and {list(shape)} differ outside axis {axis}")
    return [(*first[:axis], sum(s[axis] for s in bottoms), *first[axis + 1 :])]


@_rule("Slice")
def _slice(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = one_bottom(bottoms)
    axis = legacy_axis(layer.slice_param, "slice_dim", len(shape))
    size, count, points = shape[axis], len(layer.top), list(layer.slice_param.slice_point)
    if points:
        if len(points) != count - 1:
            raise LayerError(f"has {len(points)} slice points for {count} tops")
        bounds = [0, *points, size]
        sizes = [b - a for a, b in pairwise(bounds)]
        if any(s <= 0 for s in sizes):
            raise LayerError(f"slice points {points} must increase strictly inside 1..{size - 1}")
    else:
        if count == 0 or size % count:
            raise LayerError(f"cannot split axis {axis} of size {size} evenly into {count} tops")
        sizes = [size // count] * count
    return [(*shape[:axis], s, *shape[axis + 1 :]) for s in sizes]


@_rule("Split")
def _split(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    return [one_bottom(bottoms)] * len(layer.top)


@_rule("Silence")
def _silence(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    return []


@_rule("Flatten")
def _flatten(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = one_bottom(bottoms)
    start = canonical_axis(layer.flatten_param.axis, len(shape))
    end = canonical_axis(layer.flatten_param.end_axis, len(shape), "end_axis")
    if end + 1 < start:
        raise LayerError(f"end_axis {end} comes before axis {start}")
    return [(*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :])]


@_rule("Reshape")
def _reshape(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    p = layer.reshape_param
    shape = one_bottom(bottoms)
    start = p.axis if p.axis >= 0 else len(shape) + p.axis + 1
    end = len(shape) if p.num_axes == -1 else start + p.num_axes
    if not 0 <= start <= len(shape) or p.num_axes < -1 or end > len(shape):
        raise LayerError(f"axis {p.axis} / num_axes {p.num_axes} do not fit input {list(shape)}")
    new = list(p.shape.dim)
    if new.count(-1) > 1 or any(d < -1 for d in new):
        raise LayerError(f"shape {new} may hold one -1 and no other negative value")
    for i, d in enumerate(new):
        if d == 0:
            if start + i >= len(shape):
                raise LayerError(f"shape {new} copies (0) an axis the input {list(shape)} lacks")
            new[i] = shape[start + i]
    top = [*shape[:start], *new, *shape[end:]]
    total = math.prod(shape)
    if -1 in new:
        known = -math.prod(top)  # the -1 makes the product negative
        if known == 0 or total % known:
            raise LayerError(f"cannot infer the -1 in {list(p.shape.dim)} for input {list(shape)}")
        top[top.index(-1)] = total // known
    if math.prod(top) != total:
        raise LayerError(f"shape {list(p.shape.dim)} holds {math.prod(top)} values, the input {list(shape)} {total}")
    return [tuple(top)]


@_rule("Crop")
def _crop(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    if len(bottoms) != 2:
        raise LayerError("takes two bottoms: the input and the reference")
    shape, reference = bottoms
    if len(shape) != len(reference):
        raise LayerError(f"input {list(shape)} and reference {list(reference)} differ in rank")
    axis = canonical_axis(layer.crop_param.axis, len(shape))
    offsets = per_axis(layer.crop_param.offset, len(shape) - axis, 0, "offset")
    for i, offset in enumerate(offsets, start=axis):
        if shape[i] - offset < reference[i]:
            raise LayerError(f"offset {offset} leaves too little of axis {i} ({shape[i]}) for {reference[i]}")
    return [(*shape[:axis], *reference[axis:])]


@_rule("Tile")
def _tile(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = list(one_bottom(bottoms))
    axis = canonical_axis(layer.tile_param.axis, len(shape))
    if layer.tile_param.tiles <= 0:
        raise LayerError("tiles must be positive")
    shape[axis] *= layer.tile_param.tiles
    return [tuple(shape)]


@_rule("Reduction")
def _reduction(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = one_bottom(bottoms)
    return [shape[: canonical_axis(layer.reduction_param.axis, len(shape))]]


@_rule("ArgMax")
def _argmax(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    p = layer.argmax_param
    shape = one_bottom(bottoms)
    if p.top_k < 1:
        raise LayerError("top_k must be at least 1")
    if p.HasField("axis"):
        axis = canonical_axis(p.axis, len(shape))
        if p.top_k > shape[axis]:
            raise LayerError(f"top_k {p.top_k} exceeds axis {axis} of {list(shape)}")
        return [(*shape[:axis], p.top_k, *shape[axis + 1 :])]
    if p.top_k > math.prod(shape[1:]):
        raise LayerError(f"top_k {p.top_k} exceeds the {math.prod(shape[1:])} values per item")
    # Without an axis Caffe always answers (N, 1 or 2, top_k, 1, ...) with at least 3 axes.
    top = [1] * max(len(shape), 3)
    top[0], top[1], top[2] = shape[0], 2 if p.out_max_val else 1, p.top_k
    return [tuple(top)]


@_rule("DummyData")
def _dummy_data(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    p = layer.dummy_data_param
    count = len(layer.top)
    legacy = [list(p.num), list(p.channels), list(p.height), list(p.width)]
    if p.shape and any(legacy):
        raise LayerError("set shape or num/channels/height/width, not both")
    if p.shape:
        return [tuple(p.shape[0 if len(p.shape) == 1 else i].dim) for i in range(count)]
    if any(len(values) not in (1, count) for values in legacy):
        raise LayerError("needs num, channels, height and width, each once or once per top")
    return [tuple(values[0 if len(values) == 1 else i] for values in legacy) for i in range(count)]


@_rule("MemoryData")
def _memory_data(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    p = layer.memory_data_param
    return [(p.batch_size, p.channels, p.height, p.width), (p.batch_size,)]


@_rule("Parameter")
def _parameter(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    return [tuple(layer.parameter_param.shape.dim)]


# The layers of the widely used Caffe forks (SSD, Faster R-CNN, SegNet...): seldon_caffe/caffe/forks/.
_RULES.update(FORK_SHAPE_RULES)

# "Input" is resolved by the driver (it needs the caller's overrides) but is supported too.
SUPPORTED_LAYERS: frozenset[str] = frozenset({*_RULES, "Input"})
