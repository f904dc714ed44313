"""The `opencv` runtime: OpenCV DNN's Caffe importer, no Caffe needed.

The net is always built from our own parse of the files (seldon_caffe.caffe), so the
signature, the output names and the weights a hook reads are the same ones every other
Caffe runtime sees. OpenCV addresses outputs by the layer that wrote them, not by Caffe's
top names; `_writers` maps each output blob to its last writer and that writer's output
index (in-place layers and multi-top layers such as Slice included).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import cv2
import numpy as np

from ..caffe import CaffeNet, load_caffe_net
from ..config import ModelConfig
from ..errors import ModelLoadError, first_line
from .base import Arrays, Runtime, TensorSpec
from .builtin import OpenCVOptions
from .gaps import find_gaps


class OpenCVRuntime(Runtime):
    name = "opencv"

    def __init__(self, config: ModelConfig):
        self.caffe: CaffeNet = load_caffe_net(config.files["prototxt"], config.files["weights"])
        cv2.setNumThreads(OpenCVOptions.from_config(config).threads)
        self._lock = threading.Lock()  # a cv2.dnn.Net is not safe to share between threads
        self._writers = _last_writers(self.caffe)
        self.native = self._build()
        batch_dims = {shape[0] for shape in self.caffe.input_shapes.values() if shape}
        self.inputs = [_spec(name, shape, batch_dims) for name, shape in self.caffe.input_shapes.items()]
        self.outputs = [_spec(name, self.caffe.shapes[name], batch_dims) for name in self.caffe.outputs]
        self._warm_up()

    def _warm_up(self) -> None:
        """Run once on zeros: OpenCV creates its layers on the first forward, so a layer it
        cannot do would otherwise surface in the first request instead of at start-up."""
        zeros = {s.name: np.zeros([1 if d == -1 else d for d in s.shape], np.float32) for s in self.inputs}
        try:
            self._run(zeros, [s.name for s in self.outputs])
        except cv2.error as exc:
            gaps = "; ".join(
                f"layer {n} ({t}): {why}" for n, t, why in find_gaps(self.name, self.caffe.definition.layer)
            )
            hint = f" ({gaps}; try runtime pycaffe or onnxruntime)" if gaps else ""
            raise ModelLoadError(f"OpenCV cannot run {self.caffe.source}: {_cv_message(exc)}{hint}") from None

    def _build(self) -> cv2.dnn.Net:
        prototxt = np.frombuffer(self.caffe.prototxt_bytes(), np.uint8)
        weights = np.frombuffer(self.caffe.caffemodel_bytes(), np.uint8)
        try:
            net = cv2.dnn.readNetFromCaffe(prototxt, weights)
        except cv2.error as exc:
            raise ModelLoadError(f"OpenCV cannot load {self.caffe.source}: {_cv_message(exc)}") from None
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        # Winograd convolution drifts past 1e-4 of Caffe on ResNet-50 (1.5e-4 measured, 3e-5
        # without) and gave no clear speed-up here: faithfulness first.
        net.enableWinograd(False)
        return net

    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        # forward(name) returns a layer's first output only; forwardAndRetrieve returns all.
        layers = list(dict.fromkeys(self._writers[name][0] for name in outputs))
        with self._lock:
            for name, array in feed.items():
                self.native.setInput(array, name)
            results = dict(zip(layers, self.native.forwardAndRetrieve(layers), strict=True))
        return {
            name: np.array(results[layer][index], copy=True)
            for name in outputs
            for layer, index in [self._writers[name]]
        }

    def get_weights(self, layer: str) -> list[np.ndarray]:
        return self.caffe.get_weights(layer)

    def set_weights(self, layer: str, arrays: Sequence[np.ndarray]) -> None:
        """Replace a layer's weights. OpenCV fuses layers (BatchNorm and Scale into the
        convolution) when it first runs, after which changing a blob in place no longer
        reaches the fused copy; rebuilding the net from the updated caffemodel is the one
        way that is always right. It costs a net load (milliseconds for small nets)."""
        with self._lock:
            self.caffe.set_weights(layer, arrays)
            self.native = self._build()


def _last_writers(net: CaffeNet) -> dict[str, tuple[str, int]]:
    """blob -> (the layer that last wrote it, which of that layer's outputs it is)."""
    writers: dict[str, tuple[str, int]] = {}
    for layer in net.definition.layer:
        for index, top in enumerate(layer.top):
            # OpenCV keeps a Split as one output that all its tops share (they are copies).
            writers[top] = (layer.name, 0 if layer.type == "Split" else index)
    return writers


def _spec(name: str, shape: tuple[int, ...], batch_dims: set[int]) -> TensorSpec:
    # The batch dimension of a deploy prototxt is a placeholder: any batch size runs.
    dims = tuple(shape)
    if dims and dims[0] in batch_dims:
        dims = (-1, *dims[1:])
    return TensorSpec(name=name, dtype="float32", shape=dims)


def _cv_message(exc: cv2.error) -> str:
    return first_line(exc, last=True) or repr(exc)  # OpenCV puts what went wrong last
