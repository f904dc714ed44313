"""The `openvino` runtime: OpenVINO's CPU plugin, compiled from the same ONNX the
onnxruntime runtime loads (an ONNX file, or a Caffe model converted on load and cached).

model.yaml options it reads:

* `threads` -> INFERENCE_NUM_THREADS.
* `performance_hint`: LATENCY (default) or THROUGHPUT. A Seldon model server answers
  requests one graph run each, usually one or two at a time, and is judged on their
  latency: LATENCY gives each request every thread in one stream. THROUGHPUT splits the
  threads into several streams, which only pays when many requests are in flight at once
  (offline batch scoring); `run` then uses as many infer requests as there are streams.
* `cpu_pinning`: false (default) | true -> ENABLE_CPU_PINNING. OpenVINO pins its threads
  to cores by default; in a pod that shares its node's cores (CPU limits without the
  static CPU manager) the pinned cores may be busy with other pods and the threads cannot
  move. Measured here, on 2 shared cores: unpinned is as fast when idle, faster when busy.
  Turn it on where the pod owns its cores exclusively.
* `precision` -> INFERENCE_PRECISION_HINT, always set: fp32 -> f32. Left unset, OpenVINO
  runs in bf16 on CPUs with bf16 units (measured 2.4e-3 relative error on ResNet-50), so
  fp32 is said explicitly. bf16 and fp16 only when asked (docs/benchmarks.md reports
  their error); int8 loads the quantized ONNX (its QDQ nodes decide what runs in int8).

Thread safety: an infer request serves one call at a time, so requests live in a queue
(one per stream) and `run` borrows one; concurrent calls beyond that wait their turn.
"""

from __future__ import annotations

import logging
import queue
from typing import Any

import openvino as ov

from ..config import ModelConfig
from ..errors import ModelLoadError, first_line
from ._onnx_source import onnx_model_path, tensor_spec
from .base import Arrays, Runtime
from .builtin import OpenVinoOptions

logger = logging.getLogger(__name__)

PRECISION_HINT = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "fp16": "f16"}


class OpenVinoRuntime(Runtime):
    name = "openvino"

    def __init__(self, config: ModelConfig):
        self.options = OpenVinoOptions.from_config(config)  # device cpu only: checked there
        self.path = onnx_model_path(config, self.name)
        self.properties = compile_properties(config)
        core = ov.Core()
        try:
            self.native = core.compile_model(core.read_model(str(self.path)), "CPU", self.properties)
        except RuntimeError as exc:
            raise ModelLoadError(f"OpenVINO cannot compile {self.path}: {first_line(exc)}") from None
        # What the plugin really runs in: bf16 / f16 fall back to f32 on a CPU without those units.
        self.inference_precision = self.native.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        asked = self.properties["INFERENCE_PRECISION_HINT"]
        if self.inference_precision != asked:
            logger.warning(
                "OpenVINO runs %s in %s, not %s: this CPU lacks %s units",
                self.path.name,
                self.inference_precision,
                asked,
                asked,
            )
        self._ports = {port.get_any_name(): port for port in self.native.outputs}
        self.inputs = [_spec(port) for port in self.native.inputs]
        self.outputs = [_spec(port) for port in self.native.outputs]
        self._requests: queue.Queue[ov.InferRequest] = queue.Queue()
        for _ in range(max(1, int(self.native.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))):
            self._requests.put(self.native.create_infer_request())

    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        request = self._requests.get()
        try:
            results = request.infer(feed, share_inputs=True)
            return {name: results[self._ports[name]].copy() for name in outputs}
        finally:
            self._requests.put(request)

    def close(self) -> None:
        self._requests = queue.Queue()
        self.native = None


def compile_properties(config: ModelConfig) -> dict[str, Any]:
    """The CPU plugin's properties for `config` (see the module docstring)."""
    options = OpenVinoOptions.from_config(config)
    return {
        "INFERENCE_NUM_THREADS": options.threads,
        "PERFORMANCE_HINT": options.performance_hint,
        "INFERENCE_PRECISION_HINT": PRECISION_HINT[options.precision],
        "ENABLE_CPU_PINNING": options.cpu_pinning,
    }


def _spec(port: ov.ConstOutput) -> Any:
    dims = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
    return tensor_spec(port.get_any_name(), port.get_element_type().to_dtype().name, dims)
