"""ONNX converters for Caffe's layers that move data around: Concat, Slice, Split, Flatten,
Reshape, Crop, Tile, and the constant sources DummyData and Parameter.

Shapes are written so they hold at any batch size: a dimension Caffe copies from the input
becomes ONNX's 0 ("copy"), Caffe's -1 stays -1, and only dimensions the prototxt spells out
are written as numbers. Converting at one batch size therefore serves every batch size
Caffe itself would accept.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ._geometry import canonical_axis, legacy_axis
from .onnx_graph import LayerView, converts


@converts("Concat")
def concat(v: LayerView) -> None:
    axis = legacy_axis(v.param.concat_param, "concat_dim", len(v.bottom_shapes[0]))
    if len(v.inputs) == 1:
        v.emit("Identity", v.inputs)
    else:
        v.emit("Concat", v.inputs, axis=axis)


@converts("Slice")
def slice_(v: LayerView) -> None:
    axis = legacy_axis(v.param.slice_param, "slice_dim", len(v.bottom_shapes[0]))
    sizes = [shape[axis] for shape in v.top_shapes]
    if len(sizes) == 1:
        v.emit("Identity", v.inputs)
        return
    v.g.node("Split", [v.inputs[0], v.g.ints(sizes, "split")], v.outputs, hint=v.name, axis=axis)


@converts("Split")
def split(v: LayerView) -> None:
    """Caffe's Split copies one blob to many tops; ONNX values can simply be read many times."""
    for index in range(len(v.outputs)):
        v.emit("Identity", v.inputs, index)


@converts("Silence")
def silence(v: LayerView) -> None:
    """Silence swallows its bottoms and writes nothing."""


@converts("Flatten")
def flatten(v: LayerView) -> None:
    shape = v.bottom_shapes[0]
    start = canonical_axis(v.param.flatten_param.axis, len(shape))
    end = canonical_axis(v.param.flatten_param.end_axis, len(shape), "end_axis")
    if start == 1 and end == len(shape) - 1:
        v.emit("Flatten", v.inputs, axis=1)  # the common case, which every runtime knows
    else:
        v.g.reshape(v.inputs[0], [0] * start + [-1] + list(shape[end + 1 :]), v.outputs[0], hint=v.name)


@converts("Reshape")
def reshape(v: LayerView) -> None:
    """Caffe reshapes axes [axis, axis + num_axes) only; the rest are copied (ONNX 0)."""
    p = v.param.reshape_param
    shape = v.bottom_shapes[0]
    start = p.axis if p.axis >= 0 else len(shape) + p.axis + 1
    end = len(shape) if p.num_axes == -1 else start + p.num_axes
    # Caffe's 0 in position i copies input axis start + i: the same index in the output too.
    new = [0] * start + list(p.shape.dim)
    tail = list(shape[end:])
    if len(new) == end:  # the tail keeps its indices, so it can be copied as well
        tail = [0] * len(tail)
    v.g.reshape(v.inputs[0], new + tail, v.outputs[0], hint=v.name)


@converts("Crop")
def crop(v: LayerView) -> None:
    """Keep the reference's size on every axis from `axis` on, starting at the offsets."""
    shape, reference = v.bottom_shapes
    axis = canonical_axis(v.param.crop_param.axis, len(shape))
    axes = list(range(axis, len(shape)))
    offsets = list(v.param.crop_param.offset) or [0]
    if len(offsets) == 1:
        offsets = offsets * len(axes)
    starts = v.g.ints(offsets, "starts")
    if axis == 0:  # the batch is cropped too: take its size from the reference at run time
        ends = v.tmp("Add", [v.tmp("Shape", [v.inputs[1]]), starts])
    else:
        ends = v.g.ints([o + reference[a] for o, a in zip(offsets, axes, strict=True)], "ends")
    v.emit("Slice", [v.inputs[0], starts, ends, v.g.ints(axes, "axes")])


@converts("Tile")
def tile(v: LayerView) -> None:
    shape = v.bottom_shapes[0]
    repeats = [1] * len(shape)
    repeats[canonical_axis(v.param.tile_param.axis, len(shape))] = v.param.tile_param.tiles
    v.emit("Tile", [v.inputs[0], v.g.ints(repeats, "repeats")])


@converts("DummyData")
def dummy_data(v: LayerView) -> None:
    """Constant tops. Random fillers draw new values at every Caffe forward: not convertible."""
    fillers = list(v.param.dummy_data_param.data_filler)
    for index, shape in enumerate(v.top_shapes):
        filler = fillers[index if len(fillers) > 1 else 0] if fillers else None
        if filler is not None and filler.type != "constant":
            raise v.unsupported(
                f"filler {filler.type!r} draws random values at every forward; only 'constant' does not"
            )
        value = np.full(shape, filler.value if filler is not None else 0.0, dtype=np.float32)
        v.emit("Constant", [], index, value=numpy_helper.from_array(value, f"{v.name}/value{index}"))


@converts("Parameter")
def parameter(v: LayerView) -> None:
    """The layer's learned blob, as a constant top."""
    v.emit("Identity", [v.weight(0, "value")])
