"""The `opencv` runtime: OpenCV DNN's Caffe importer, no Caffe needed.

The net is always built from our own parse of the files (seldon_caffe.caffe), so the
signature, the output names and the weights a hook reads are the same ones every other
Caffe runtime sees. OpenCV addresses outputs by the layer that wrote them, not by Caffe's
top names; `_writers` maps each output blob to its last writer and that writer's output
index (in-place layers and multi-top layers such as Slice included), so any blob of the net
can be answered (model.yaml `outputs:`).

OpenCV reshapes the net on setInput, as Caffe does, so a net with free input dims (a fully
convolutional net, a placeholder input: runtimes/caffe_model.py) runs at any size the
shape rules accept; the rules are checked first, so a size the net cannot take is a 400
before OpenCV sees it. OpenCV's own sizes differ from Caffe's in one corner: a pooling
window larger than its input (a 1x1 image into a 2x2 max pool) is empty to OpenCV, where
Caffe clips it; such a request is a 400 too, saying which runtimes take it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence

import cv2
import numpy as np

from ..caffe import CaffeNet
from ..caffe.forks.ssd import caffe_ssd_rows
from ..config import ModelConfig
from ..errors import BadRequest, ModelLoadError, first_line
from .base import Arrays, Runtime
from .builtin import OpenCVOptions
from .caffe_model import CaffeModel, ShapeKey
from .gaps import find_gaps

logger = logging.getLogger(__name__)


class OpenCVRuntime(Runtime):
    name = "opencv"

    def __init__(self, config: ModelConfig, caffe: CaffeModel | None = None):
        """`caffe`: serve this Caffe net (e.g. one made in memory) instead of the config's files."""
        self.model = caffe or CaffeModel.from_config(config)
        self.caffe: CaffeNet = self.model.net()
        cv2.setNumThreads(OpenCVOptions.from_config(config).threads)
        self._lock = threading.Lock()  # a cv2.dnn.Net is not safe to share between threads
        self._writers = _last_writers(self.caffe)
        self._detections = {
            top for layer in self.caffe.definition.layer if layer.type == "DetectionOutput" for top in layer.top
        }
        self.native = self._build()
        self.inputs, self.outputs = list(self.model.inputs), list(self.model.outputs)
        self.example_shapes = dict(self.model.warm_shapes)
        self._warm_up()

    def _warm_up(self) -> None:
        """Run once on zeros: OpenCV creates its layers on the first forward, so a layer it
        cannot do would otherwise surface in the first request instead of at start-up."""
        if self.model.placeholder:  # 1x1 would only test OpenCV's empty pooling windows
            logger.warning("%s: no input size to warm up at; the first request sets up OpenCV", self.caffe.source)
            return
        try:
            self._run(self.model.zeros(), [s.name for s in self.outputs])
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
        key = self.model.check({name: array.shape for name, array in feed.items()})  # before OpenCV sees it
        # forward(name) returns a layer's first output only; forwardAndRetrieve returns all.
        layers = list(dict.fromkeys(self._writers[name][0] for name in outputs))
        if not layers:  # forwardAndRetrieve([]) crashes the process (SIGSEGV)
            return {}
        with self._lock:
            for name, array in feed.items():
                self.native.setInput(array, name)
            try:
                results = dict(zip(layers, self.native.forwardAndRetrieve(layers), strict=True))
            except cv2.error as exc:
                raise self._size_error(key, exc) from None
        answers = {
            name: np.array(results[layer][index], copy=True)
            for name in outputs
            for layer, index in [self._writers[name]]
        }
        batch = next(iter(feed.values())).shape[0] if feed else 1
        for name in self._detections.intersection(answers):  # OpenCV's padding and order -> caffe-ssd's
            answers[name] = caffe_ssd_rows(answers[name], batch)
        return answers

    def _size_error(self, key: ShapeKey, exc: cv2.error) -> Exception:
        """A 400 when OpenCV fails at a size other than the warm-up one (which it ran), and
        that Caffe's rules accept: OpenCV's sizes differ from Caffe's there (module docstring)."""
        if key == self.model.warm_key and not self.model.placeholder:
            return exc
        sent = ", ".join(f"{name}[N, {', '.join(map(str, dims))}]" for name, dims in key)
        ran = ", ".join(f"{name}{list(shape)}" for name, shape in self.model.warm_shapes.items())
        return BadRequest(
            f"OpenCV cannot run {self.caffe.source} at input shapes {sent} ({_cv_expected(exc)}), although "
            f"Caffe's shape rules take them: send a larger size (it runs at {ran}), or serve the model with "
            "runtime onnxruntime, openvino, torch or pycaffe"
        )

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


def _cv_message(exc: cv2.error) -> str:
    return first_line(exc, last=True) or repr(exc)  # OpenCV puts what went wrong last


def _cv_expected(exc: cv2.error) -> str:
    """The check OpenCV failed ("total(os[i]) > 0": a blob came out empty), else its message."""
    found = re.search(r"expected: '([^']+)'", str(exc))
    return f"its check {found.group(1)} failed" if found else _cv_message(exc)
