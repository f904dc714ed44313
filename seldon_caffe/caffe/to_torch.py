"""A Caffe net as a torch module: the ONNX graph our converter writes, rebuilt in torch.fx.

Why from our ONNX and not from the Caffe layers: every Caffe layer's exact semantics
(pooling's output size and divisor, BatchNorm's moving-average factor, MVN's eps, ArgMax's
ties...) are stated once, in the ONNX converters, which the conformance suite checks
against real Caffe. Here each of the few dozen ONNX ops those converters emit becomes one
torch call, so the torch module inherits that proof instead of restating it.

Why not onnx2torch (the maintained ONNX -> torch converter): on our conformance nets it
refused asymmetric average-pool padding (Caffe's ceil rounding) and GlobalMaxPool, and its
Reshape / Slice / Tile modules read shape tensors at run time, which `torch.export` cannot
trace with a dynamic batch. Here every shape, axis and index comes from the graph's
constants at build time: the result is a plain `torch.fx.GraphModule` of torch functions,
fast to call, and exportable (`.pt2`) or scriptable (`.pt`) with any batch size.

Two things differ from a literal translation, both exact up to float rounding:
* a Conv followed by BatchNormalization and per-channel Mul / Add (Caffe's BatchNorm +
  Scale) is folded into the Conv's weights, as inference engines do: on a GPU those extra
  passes over every activation cost more than the convolution saves;
* pooling with Caffe's end padding uses torch's `ceil_mode` where it gives the same windows,
  instead of a separate padding pass.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from . import torch_ops_forks, torch_ops_ssd  # noqa: F401 (they register the fork layers' ops)
from .onnx_graph import value_dims
from .torch_ops import OPS, Node, TorchBuilder, UnsupportedOp

__all__ = ["UnsupportedOp", "fold_affine_into_conv", "onnx_to_torch", "save_torch"]


def onnx_to_torch(model: onnx.ModelProto) -> Any:
    """A `torch.fx.GraphModule` computing `model`'s outputs, returned as a dict by name.

    `forward` takes the graph inputs positionally, in the graph's order. Only the ops our
    Caffe converter writes are supported; anything else raises UnsupportedOp.
    """
    import torch
    import torch.fx

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    outputs = [o.name for o in graph.output]
    nodes = fold_affine_into_conv(_nodes(graph), constants, outputs)
    builder = TorchBuilder(torch, constants, _shapes(model))
    for value in graph.input:
        if value.name not in constants:
            builder.input(value.name)
    for node in nodes:
        handler = OPS.get(node.op)
        if handler is None:
            raise UnsupportedOp(f"ONNX node {node.name!r}: op {node.op} has no torch form here")
        results = handler(builder, node)
        builder.values.update(zip(node.outputs, results if isinstance(results, tuple) else (results,), strict=False))
    builder.graph.output({name: builder.tensor(name).node for name in outputs})
    module = torch.fx.GraphModule(builder.root, builder.graph, class_name="CaffeNet")
    return module.eval()


def save_torch(model: onnx.ModelProto, path: str | os.PathLike[str]) -> str:
    """Write `model` rebuilt in torch to `path` (atomically): an ExportedProgram for `.pt2`,
    else a TorchScript archive. A symbolic batch stays any size. Returns what was written."""
    import torch

    module, path = onnx_to_torch(model), Path(path)
    constants = {t.name for t in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in constants]
    dims = [value_dims(value) for value in inputs]
    examples = tuple(torch.zeros([2 if d is None else d for d in shape]) for shape in dims)  # export: 2, not 1
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")  # torch.export wants .pt2
    try:
        if path.suffix == ".pt2":
            torch.export.save(_export(torch, module, examples, dims), partial)
            kind = "ExportedProgram"
        else:
            with warnings.catch_warnings():  # torch.jit's deprecation: asking for .pt is asking for it
                warnings.simplefilter("ignore")
                torch.jit.save(torch.jit.script(module), partial)
            kind = "TorchScript archive"
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return kind


def _export(torch: Any, module: Any, examples: tuple, dims: list[list[int | None]]) -> Any:
    """torch.export with each input's free dims free. One size per input first: a net whose
    inputs' leading dims differ (ROIPooling's rois and feature map) must keep them apart;
    where the graph ties them (a Concat of two inputs), export refuses that and one shared
    size is what the net takes."""
    own = [torch.export.Dim(f"batch_{i}", min=1) for i in range(len(dims))]
    try:
        return torch.export.export(module, examples, dynamic_shapes=_free(dims, own))
    except Exception:  # torch's constraint violation (its class moved between releases)
        shared = torch.export.Dim("batch", min=1)
        return torch.export.export(module, examples, dynamic_shapes=_free(dims, [shared] * len(dims)))


def _free(dims: list[list[int | None]], sizes: list[Any]) -> tuple:
    """torch.export's dynamic_shapes: each input's unknown dims bound to its size symbol."""
    return tuple(
        {i: size for i, d in enumerate(shape) if d is None} or None for shape, size in zip(dims, sizes, strict=True)
    )


def _nodes(graph: onnx.GraphProto) -> list[Node]:
    return [
        Node(
            n.op_type,
            list(n.input),
            list(n.output),
            {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute},
            n.name,
        )
        for n in graph.node
    ]


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Each value's shape, from ONNX shape inference where it knows (None: a symbolic dim)."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = value_dims(value)
    return shapes


# -- Conv + BatchNorm / Scale folding -----------------------------------------------------


def fold_affine_into_conv(nodes: list[Node], constants: dict[str, np.ndarray], outputs: Sequence[str]) -> list[Node]:
    """Fold each Conv's sole-consumer chain of BatchNormalization / per-channel Mul / Add
    (all operands constant) into the Conv's weight and bias. `constants` gains the new arrays."""
    uses: dict[str, int] = {}
    for node in nodes:
        for name in node.inputs:
            uses[name] = uses.get(name, 0) + 1
    for name in outputs:
        uses[name] = uses.get(name, 0) + 1
    consumer_of = {name: node for node in nodes for name in node.inputs if uses.get(name) == 1}
    dropped: set[str] = set()
    replaced: dict[str, Node] = {}
    for node in nodes:
        if (
            node.op != "Conv"
            or node.inputs[1] not in constants
            or len(node.inputs) > 2
            and node.inputs[2] not in constants
        ):
            continue
        weight = constants[node.inputs[1]].astype(np.float64)
        bias = constants[node.inputs[2]].astype(np.float64) if len(node.inputs) > 2 else np.zeros(weight.shape[0])
        out, folded = node.outputs[0], False
        while (nxt := consumer_of.get(out)) is not None and (step := _affine(nxt, out, constants, weight.ndim)):
            scale, shift = step
            weight = weight * scale.reshape(-1, *[1] * (weight.ndim - 1))
            bias = bias * scale + shift
            dropped.add(nxt.name)
            out, folded = nxt.outputs[0], True
        if folded:
            w_name, b_name = f"{node.name}/folded_weight", f"{node.name}/folded_bias"
            constants[w_name], constants[b_name] = weight.astype(np.float32), bias.astype(np.float32)
            replaced[node.name] = Node("Conv", [node.inputs[0], w_name, b_name], [out], node.attrs, node.name)
    return [replaced.get(node.name, node) for node in nodes if node.name not in dropped]


def _affine(node: Node, x: str, constants: dict[str, np.ndarray], rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) per output channel if `node` is y = x * scale + shift with constants."""
    if node.op == "BatchNormalization":
        if len(node.outputs) > 1 or not all(name in constants for name in node.inputs[1:]):
            return None
        gamma, beta, mean, var = (constants[name].astype(np.float64) for name in node.inputs[1:5])
        scale = gamma / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
        return scale, beta - mean * scale
    if node.op not in ("Mul", "Add") or len(node.inputs) != 2:
        return None
    other = node.inputs[1] if node.inputs[0] == x else node.inputs[0]
    if other == x or other not in constants:
        return None
    channels = _per_channel(constants[other], rank)
    if channels is None:
        return None
    return (channels, np.zeros_like(channels)) if node.op == "Mul" else (np.ones_like(channels), channels)


def _per_channel(array: np.ndarray, rank: int) -> np.ndarray | None:
    """The array as one value per channel (axis 1 of a rank-`rank` tensor), if it broadcasts so."""
    if array.ndim > rank or not np.issubdtype(array.dtype, np.floating):
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return array.astype(np.float64).reshape(-1)
