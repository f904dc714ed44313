"""Caffe -> ONNX: a Caffe net (prototxt + caffemodel) as an ONNX model, with no Caffe needed.

The converter reads our own parse of the files (`load_caffe_net`: upgraded definition,
shapes, weights as numpy) and writes one ONNX node group per Caffe layer, through the
per-family converters in `onnx_nn.py`, `onnx_math.py` and `onnx_shape.py`. Promises:

* every layer type in `SUPPORTED_LAYERS` converts, or fails with an error naming the layer
  and its type (never a silent approximation);
* graph inputs and outputs carry the Caffe blob names, and an in-place blob's final value
  carries its Caffe name (see `onnx_graph.py`);
* the batch dimension is symbolic ("N") by default, or fixed with `batch=N`; every other
  dimension is the one the net has at its declared input shapes, or at `input_shapes`
  (Caffe reshapes per call, but pooling's end padding, window divisors, Reshape dims... are
  baked in here, so a net served at several sizes is converted once per size);
* the graph outputs are the net's outputs (`CaffeNet.outputs`), or any blobs named in
  `outputs=` (an intermediate blob is exposed as it is after its last in-place layer, as
  Caffe's `net.blobs[name]` holds it);
* the model passes `onnx.checker`.

`CONVERTER_VERSION` (caffe/converter_version.py) is part of the conversion cache key
(`runtimes/_onnx_source.py`): bump it whenever the ONNX this module writes for the same Caffe
files changes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import onnx
from onnx import helper

from ..progress import Progress
from . import caffe_pb2, onnx_forks, onnx_math, onnx_nn, onnx_shape, onnx_ssd  # noqa: F401 (the onnx_* modules register converters)
from .converter_version import CONVERTER_VERSION
from .forks.ssd import data_dependent_axes
from .io import CaffeFormatError, PathLike
from .net import CaffeNet, load_caffe_net
from .onnx_graph import CONVERTERS, DEFAULT_OPSET, MIN_OPSET, GraphBuilder, LayerView, UnsupportedLayer, value_info
from .params import param_shapes
from .shapes import SUPPORTED_LAYERS, Shape, infer_shapes

BATCH_DIM = "N"
_INPUT_LAYERS = ("Input", "MemoryData")  # their tops become graph inputs

__all__ = [
    "BATCH_DIM",
    "CONVERTER_VERSION",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "UnsupportedLayer",
    "caffe_to_onnx",
    "convert_files",
    "unconvertible_layers",
]


def unconvertible_layers() -> list[str]:
    """Layer types our Caffe format reads but the converter cannot write (should be none)."""
    # A Python layer runs the user's code between the engine's parts (runtimes/segmented.py).
    return sorted(SUPPORTED_LAYERS - set(CONVERTERS) - set(_INPUT_LAYERS) - {"Python"})


def caffe_to_onnx(
    net: CaffeNet,
    *,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    outputs: Sequence[str] | None = None,
    progress: bool | None = None,
    stream: TextIO | None = None,
) -> onnx.ModelProto:
    """The ONNX model of `net` (which must hold weights).

    `batch=None` makes the batch dimension symbolic; a net whose layers fix the batch size
    (e.g. a Reshape that spells it out) then raises CaffeFormatError asking for `batch=N`.
    `input_shapes` {input: shape} converts for those sizes instead of the declared ones (the
    first dim is ignored: the batch follows `batch`); `outputs` names the blobs to expose
    (default: `net.outputs`). `progress` draws a bar on `stream` (stderr): None = only when
    it is a terminal.
    """
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {opset} is not supported; use {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    shapes, dims = _shapes_and_dims(net, batch, input_shapes)
    _free_data_dependent_dims(net, dims)
    answers = _graph_outputs(net, shapes, outputs)
    layers = list(net.definition.layer)
    last_writer = {top: i for i, layer in enumerate(layers) for top in layer.top}
    graph_inputs = [top for layer in layers if layer.type in _INPUT_LAYERS for top in layer.top]
    g = GraphBuilder(opset, reserved=shapes)
    current: dict[str, str] = {}  # Caffe blob -> ONNX name of its latest value
    bar = Progress(len(layers), f"converting {Path(net.source).name}", stream or sys.stderr, progress)
    for i, layer in enumerate(layers):
        bar.step(layer.name)
        if layer.type in _INPUT_LAYERS:
            current.update((top, top) for top in layer.top)
            continue
        outputs = [
            top if last_writer[top] == i and top not in graph_inputs else g.name(f"{top}@{layer.name}")
            for top in layer.top
        ]
        view = LayerView(
            param=layer,
            g=g,
            inputs=[current[b] for b in layer.bottom],
            outputs=outputs,
            bottom_shapes=[shapes[b] for b in layer.bottom],
            top_shapes=[shapes[t] for t in layer.top],
            blobs=_weights(net, layer),
        )
        converter = CONVERTERS.get(layer.type)
        if converter is None:
            raise view.unsupported("no converter for this layer type")
        converter(view)
        current.update(zip(layer.top, outputs, strict=True))
    bar.close()
    graph = helper.make_graph(
        g.nodes,
        net.definition.name or Path(net.source).stem,
        inputs=[value_info(name, dims[name]) for name in graph_inputs],
        outputs=[value_info(current[name], dims[name]) for name in answers],
        initializer=g.initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph, opset_imports=opsets, producer_name="seldon-caffe", producer_version=CONVERTER_VERSION
    )
    model.ir_version = helper.find_min_ir_version_for(opsets)  # readable by the oldest runtime that knows the opset
    helper.set_model_props(model, {"seldon_caffe.source": os.path.basename(net.source)})
    onnx.checker.check_model(model)
    return model


def convert_files(
    prototxt: PathLike,
    weights: PathLike,
    output: PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    progress: bool | None = None,
) -> onnx.ModelProto:
    """Convert a prototxt + caffemodel pair and write the ONNX file (atomically)."""
    model = caffe_to_onnx(load_caffe_net(prototxt, weights), opset=opset, batch=batch, progress=progress)
    write_onnx(model, output)
    return model


def write_onnx(model: onnx.ModelProto, output: PathLike) -> None:
    """Save `model` atomically: a reader never sees a half-written file (the runtimes' cache)."""
    output = Path(output)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        onnx.save_model(model, partial)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def _graph_outputs(net: CaffeNet, shapes: Mapping[str, Shape], outputs: Sequence[str] | None) -> list[str]:
    """The blobs to expose: `outputs` (checked to be blobs some layer writes: a graph output
    cannot carry a graph input's name), else the net's outputs."""
    if outputs is None:
        return list(net.outputs)
    written = {top for layer in net.definition.layer if layer.type not in _INPUT_LAYERS for top in layer.top}
    unknown = [name for name in outputs if name not in written]
    if unknown:
        raise CaffeFormatError(
            f"{net.source}: no layer writes a blob named {unknown[0]!r}; the blobs layers write are "
            f"{', '.join(b for b in shapes if b in written)}"
        )
    return list(dict.fromkeys(outputs))


def _weights(net: CaffeNet, layer: caffe_pb2.LayerParameter) -> list[np.ndarray]:
    """The layer's learned blobs ([] for a layer that learns nothing)."""
    if not param_shapes(layer, [net.shapes[b] for b in layer.bottom]):
        return []
    try:
        return net.get_weights(layer.name)
    except ValueError as exc:  # no caffemodel was loaded
        raise CaffeFormatError(f"{net.source}: {exc}") from None


def _shapes_and_dims(
    net: CaffeNet, batch: int | None, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[dict[str, Shape], dict[str, list[int | str | None]]]:
    """Blob shapes to convert with, and the declared dims of every blob for the graph signature.

    With a symbolic batch, shapes are inferred at two batch sizes: a dim equal to the batch
    both times is the batch ("N"), one that changes otherwise is unknown (None), and one that
    stays is fixed. A net that cannot take a second batch size is reported, not guessed at.
    """
    inputs = _input_shapes(net, input_shapes)
    if batch is not None:
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        shapes = infer_shapes(net.definition, {n: (batch, *s[1:]) for n, s in inputs.items()})
        return shapes, {name: list(shape) for name, shape in shapes.items()}
    try:
        one, two = (infer_shapes(net.definition, {n: (b, *s[1:]) for n, s in inputs.items()}) for b in (1, 2))
    except CaffeFormatError as exc:
        raise CaffeFormatError(
            f"{net.source}: the net only runs at its declared batch size ({exc}); "
            "convert with a fixed batch (--batch N)"
        ) from None
    dims = {name: [_dim(a, b) for a, b in zip(one[name], two[name], strict=True)] for name in one}
    return (infer_shapes(net.definition, inputs) if input_shapes else net.shapes), dims


def _free_data_dependent_dims(net: CaffeNet, dims: dict[str, list[int | str | None]]) -> None:
    """Axes whose size only the data decides (DetectionOutput's rows) are unknown (None) in
    the signature, whatever placeholder size the shape rules give them."""
    for blob, axes in data_dependent_axes(net.definition).items():
        for axis in axes:
            dims[blob][axis] = None


def _dim(at_one: int, at_two: int) -> int | str | None:
    if at_one == at_two:
        return at_one
    return BATCH_DIM if (at_one, at_two) == (1, 2) else None


def _input_shapes(net: CaffeNet, sizes: Mapping[str, Sequence[int]] | None = None) -> Mapping[str, Shape]:
    """The tops whose batch size a caller may choose (MemoryData's is fixed by its batch_size),
    at their declared shapes or, batch aside, at `sizes`."""
    declared = {top: net.shapes[top] for layer in net.definition.layer if layer.type == "Input" for top in layer.top}
    unknown = sorted(set(sizes or ()) - set(declared))
    if unknown:
        raise CaffeFormatError(f"{net.source}: no input named {unknown[0]!r}; the inputs are {', '.join(declared)}")
    return {top: (shape[0], *(sizes or {}).get(top, shape)[1:]) for top, shape in declared.items()}
