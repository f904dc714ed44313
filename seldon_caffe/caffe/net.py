"""A Caffe model as the runtimes see it: upgraded definition, shapes, and weights as numpy.

`load_caffe_net` does all the checking a serving process wants before any engine starts:
the prototxt parses and upgrades, every layer is understood and its shapes are known, and
the caffemodel's blobs belong to this prototxt. Runtimes then build their engine from
`prototxt_bytes()` / `caffemodel_bytes()`, which are always in today's format.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..errors import BadRequest
from . import _wire, caffe_pb2
from ._geometry import Shape
from .io import (
    CaffeFormatError,
    PathLike,
    caffemodel_weights,
    format_prototxt,
    parse_caffemodel,
    parse_prototxt,
    read_bytes,
)
from .params import param_shapes
from .python_layer import model_directory
from .shapes import infer_shapes
from .tolerant import unknown_fields
from .upgrade import upgrade_net


class WeightsError(BadRequest, ValueError):
    """get_weights / set_weights named a layer without weights or passed the wrong arrays:
    the caller's mistake, so a request gets 400, as with pycaffe and tensorflow. Still a
    ValueError for code that uses CaffeNet directly (the converters catch that)."""


class LayerInfo(NamedTuple):
    """One layer of the net: what it is called, its type, and the blobs it reads and writes."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]


def load_caffe_net(prototxt_path: PathLike, weights_path: PathLike | None = None) -> CaffeNet:
    """Read, upgrade and check a prototxt and (optionally) its caffemodel.

    When the net fails its checks after fields unknown to us were skipped, the error lists
    them: a misplaced or misspelt field is the likelier cause than a fork's extra setting.
    """
    text = read_bytes(prototxt_path, "prototxt")
    definition = parse_prototxt(text, source=os.fspath(prototxt_path))
    weights = read_bytes(weights_path, "caffemodel") if weights_path is not None else None
    weights_source = os.fspath(weights_path) if weights_path is not None else "<caffemodel>"
    try:
        return CaffeNet(definition, weights, source=os.fspath(prototxt_path), weights_source=weights_source)
    except CaffeFormatError as exc:
        skipped = unknown_fields(text)
        if not skipped:
            raise
        listed = "; ".join(f.describe() for f in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        raise CaffeFormatError(f"{exc} (skipped on reading, as fields our caffe.proto lacks: {listed})") from None


class CaffeNet:
    """An upgraded Caffe net with known blob shapes and (when given) its weights as arrays.

    `definition` is the upgraded NetParameter without blobs; `shapes` maps every blob to its
    final shape; `input_shapes` the Input tops; `outputs` the blobs no later layer consumes,
    in the order they are produced (pycaffe lists the same names alphabetically); `layers`
    the layers as `LayerInfo`. Weights are held per layer name, the way a caffemodel
    stores them; layers that share a named param (e.g. siamese nets) share the array.
    """

    def __init__(
        self,
        definition: caffe_pb2.NetParameter,
        weights: caffe_pb2.NetParameter | bytes | None = None,
        *,
        source: str = "<prototxt>",
        weights_source: str = "<caffemodel>",
    ) -> None:
        net = upgrade_net(definition, source)
        for layer in net.layer:
            layer.ClearField("blobs")
        if not net.layer:
            raise CaffeFormatError(f"{source}: the net defines no layers")
        # Layers with weights, by name: the key a caffemodel and get/set_weights use.
        self._layer_params: dict[str, caffe_pb2.LayerParameter] = {}
        self._param_shapes: dict[str, list[Shape]] = {}
        try:
            # A Python layer's shapes come from its class, imported from the prototxt's directory
            # unless a runtime named the model directory (caffe/python_layer.py).
            with model_directory(os.path.dirname(source) if os.path.isfile(source) else None, keep_outer=True):
                self.shapes: dict[str, Shape] = infer_shapes(net)
            for layer in net.layer:
                shapes = param_shapes(layer, [self.shapes[b] for b in layer.bottom])
                if shapes and layer.name in self._layer_params:
                    raise CaffeFormatError(f"two layers with weights are both named {layer.name!r}")
                if shapes:
                    self._layer_params[layer.name], self._param_shapes[layer.name] = layer, shapes
        except CaffeFormatError as exc:
            raise CaffeFormatError(f"{source}: {exc}") from None
        self.definition = net
        self.source = source
        self.layers = [LayerInfo(la.name, la.type, tuple(la.bottom), tuple(la.top)) for la in net.layer]
        self.input_shapes = {top: self.shapes[top] for la in net.layer if la.type == "Input" for top in la.top}
        self.outputs = _net_outputs(net)
        self._weights: dict[str, list[np.ndarray]] = {}
        if weights is not None:
            data = weights.SerializeToString() if isinstance(weights, caffe_pb2.NetParameter) else weights
            self._load_weights(caffemodel_weights(data, weights_source), weights_source)

    # -- weights ---------------------------------------------------------------------

    def _load_weights(self, stored: dict[str, list[np.ndarray]], source: str) -> None:
        """Match the caffemodel's blobs to our layers by name, as Caffe does."""
        by_param_name: dict[str, np.ndarray] = {}
        for name, layer in self._layer_params.items():
            where = f"{source}: layer {name!r} ({layer.type})"
            if name in stored:
                self._weights[name] = self._conform(name, stored[name], where, CaffeFormatError)
            else:
                shared = [by_param_name.get(spec) for spec in self._param_names(name)]
                if not shared or any(array is None for array in shared):
                    raise CaffeFormatError(f"{where} has no weights: the caffemodel is truncated or from another net")
                self._weights[name] = [a for a in shared if a is not None]
            for spec, array in zip(self._param_names(name), self._weights[name], strict=False):
                if spec:
                    by_param_name.setdefault(spec, array)

    def _param_names(self, name: str) -> list[str]:
        """The share names of a layer's params, one per learned blob ('' = not shared)."""
        specs = [spec.name for spec in self._layer_params[name].param]
        count = len(self._param_shapes[name])
        return (specs + [""] * count)[:count]

    def _conform(self, name: str, arrays: Sequence[np.ndarray], where: str, error: type[Exception]) -> list[np.ndarray]:
        """Check arrays against the layer's blob shapes; return float32 copies in those shapes.

        A 4-D blob whose shape is the expected one padded with leading 1s is accepted, as
        Caffe does for blobs saved in the old num/channels/height/width form.
        """
        expected = self._param_shapes[name]
        if len(arrays) != len(expected):
            raise error(f"{where} takes {len(expected)} arrays of shapes {_fmt(expected)}, got {len(arrays)}")
        fitted = []
        for i, (array, shape) in enumerate(zip(arrays, expected, strict=True)):
            value = np.array(array, dtype=np.float32)  # a copy: the caller keeps theirs
            legacy = value.ndim == 4 and len(shape) < 4 and value.shape == (1,) * (4 - len(shape)) + shape
            if value.shape != shape and not legacy:
                raise error(f"{where} array {i} must have shape {list(shape)}, got {list(value.shape)}")
            fitted.append(value.reshape(shape))
        return fitted

    def _layer(self, layer: str) -> caffe_pb2.LayerParameter:
        if layer not in self._layer_params:
            known = ", ".join(self._layer_params) or "none"
            raise WeightsError(f"no layer with weights named {layer!r}; layers with weights: {known}")
        return self._layer_params[layer]

    def weight_shapes(self, layer: str) -> list[Shape]:
        """The shapes `set_weights(layer, ...)` expects, in Caffe's blob order."""
        self._layer(layer)
        return list(self._param_shapes[layer])

    def get_weights(self, layer: str) -> list[np.ndarray]:
        """Copies of the layer's learned blobs (weights, then bias, ...)."""
        self._layer(layer)
        if layer not in self._weights:
            raise ValueError(f"layer {layer!r} has no weights yet: no caffemodel was loaded or set for it")
        return [array.copy() for array in self._weights[layer]]

    def set_weights(self, layer: str, arrays: Sequence[np.ndarray]) -> None:
        """Replace the layer's learned blobs; counts and shapes must match (WeightsError if not).

        Layers sharing a named param with this one see the new values too, as in Caffe.
        """
        param = self._layer(layer)
        fitted = self._conform(layer, list(arrays), f"layer {layer!r} ({param.type})", WeightsError)
        self._weights[layer] = fitted
        names = self._param_names(layer)
        for other in self._layer_params:
            other_names = self._param_names(other)
            links = {j: names.index(n) for j, n in enumerate(other_names) if n and n in names}
            if other == layer or not links:
                continue
            if other in self._weights:
                for j, i in links.items():
                    self._weights[other][j] = fitted[i]
            elif len(links) == len(other_names):
                self._weights[other] = [fitted[links[j]] for j in range(len(other_names))]

    # -- export ----------------------------------------------------------------------

    def to_caffemodel(self) -> caffe_pb2.NetParameter:
        """The definition with the current weights as blobs: what a caffemodel file holds."""
        return parse_caffemodel(self.caffemodel_bytes(), self.source)

    def caffemodel_bytes(self) -> bytes:
        """The caffemodel bytes (today's format) that Caffe and OpenCV load with `prototxt_bytes()`.

        Built at the wire level, so exporting a large net costs a copy of its weights.
        """
        return _wire.caffemodel_bytes(self.definition, self._weights)

    def prototxt_bytes(self) -> bytes:
        """The upgraded definition as prototxt text."""
        return format_prototxt(self.definition).encode("utf-8")


def _net_outputs(net: caffe_pb2.NetParameter) -> list[str]:
    """Blobs that no later layer reads, in the order of their last production.

    A Silence layer does not count as a reader: it only tells Caffe the blob is unused on
    purpose, and deploy files use it on their very answer (colorization's class8_ab, which
    OpenCV's sample reads by name). Caffe's own net.outputs leaves such a blob out.
    """
    available: dict[str, None] = {}
    for layer in net.layer:
        for name in layer.bottom if layer.type != "Silence" else ():
            available.pop(name, None)
        for name in layer.top:
            available.pop(name, None)
            available[name] = None
    return list(available)


def _fmt(shapes: Sequence[Shape]) -> str:
    return ", ".join(str(list(shape)) for shape in shapes)
