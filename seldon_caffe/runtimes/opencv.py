"""The `opencv` runtime: OpenCV DNN's Caffe importer, no Caffe needed.

The net is always built from our own parse of the files (seldon_caffe.caffe), so the
signature, the output names and the weights a hook reads are the same ones every other
Caffe runtime sees. OpenCV addresses outputs by the layer that wrote them, not by Caffe's
top names; `_writers` maps each output blob to its last writer (in-place layers included).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import cv2
import numpy as np

from ..caffe import CaffeNet, load_caffe_net
from ..config import ModelConfig
from ..errors import ModelLoadError
from .base import Arrays, Runtime, TensorSpec


class OpenCVRuntime(Runtime):
    name = "opencv"

    def __init__(self, config: ModelConfig):
        self.caffe: CaffeNet = load_caffe_net(config.files["prototxt"], config.files["weights"])
        cv2.setNumThreads(int(config.options["threads"]))
        self._lock = threading.Lock()  # a cv2.dnn.Net is not safe to share between threads
        self._writers = _last_writers(self.caffe)
        self.native = self._build()
        batch_dims = {shape[0] for shape in self.caffe.input_shapes.values() if shape}
        self.inputs = [_spec(name, shape, batch_dims) for name, shape in self.caffe.input_shapes.items()]
        self.outputs = [_spec(name, self.caffe.shapes[name], batch_dims) for name in self.caffe.outputs]

    def _build(self) -> cv2.dnn.Net:
        prototxt = np.frombuffer(self.caffe.prototxt_bytes(), np.uint8)
        weights = np.frombuffer(self.caffe.caffemodel_bytes(), np.uint8)
        try:
            net = cv2.dnn.readNetFromCaffe(prototxt, weights)
        except cv2.error as exc:
            raise ModelLoadError(f"OpenCV cannot load {self.caffe.source}: {_cv_message(exc)}") from None
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        return net

    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        layers = [self._writers[name] for name in outputs]
        with self._lock:
            for name, array in feed.items():
                self.native.setInput(array, name)
            results = self.native.forward(layers)
        return {name: np.array(result, copy=True) for name, result in zip(outputs, results, strict=True)}

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


def _last_writers(net: CaffeNet) -> dict[str, str]:
    writers: dict[str, str] = {}
    for layer in net.definition.layer:
        for top in layer.top:
            writers[top] = layer.name
    return writers


def _spec(name: str, shape: tuple[int, ...], batch_dims: set[int]) -> TensorSpec:
    # The batch dimension of a deploy prototxt is a placeholder: any batch size runs.
    dims = tuple(shape)
    if dims and dims[0] in batch_dims:
        dims = (-1, *dims[1:])
    return TensorSpec(name=name, dtype="float32", shape=dims)


def _cv_message(exc: cv2.error) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else repr(exc)
