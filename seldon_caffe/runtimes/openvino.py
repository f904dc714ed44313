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
* `shape_cache`: for a Caffe net whose inputs have free dims (any image size), how many
  compiled models to keep, one per input shape (runtimes/per_shape.py; default 8).

Thread safety: an infer request serves one call at a time, so requests live in a queue
(one per stream) and `run` borrows one; concurrent calls beyond that wait their turn.
"""

from __future__ import annotations

import io
import logging
import queue
from pathlib import Path
from typing import Any

import openvino as ov

from ..config import ModelConfig
from ..errors import ModelLoadError, first_line
from ._onnx_source import onnx_model_path, tensor_spec
from .base import Arrays, Runtime
from .builtin import OpenVinoOptions
from .caffe_model import CaffeModel
from .per_shape import ShapeCache

logger = logging.getLogger(__name__)

PRECISION_HINT = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "fp16": "f16"}


class OpenVinoRuntime(Runtime):
    name = "openvino"

    def __init__(self, config: ModelConfig, caffe: CaffeModel | None = None):
        """`caffe`: serve this Caffe net (e.g. one made in memory) instead of the config's files."""
        self.options = OpenVinoOptions.from_config(config)  # device cpu only: checked there
        self.properties = compile_properties(config)
        self.plans: ShapeCache[Compiled] | None = None
        if caffe is None and config.format == "caffe" and self.options.precision != "int8":
            caffe = CaffeModel.from_config(config)
        if caffe is not None:  # one compiled model per input shape (the batch aside)
            self.plans = ShapeCache(caffe, self._compile, self.options.shape_cache, config)
            self.path, self._first = self.plans.path, self.plans.first
            self.inputs, self.outputs = list(caffe.inputs), list(caffe.outputs)
            self.example_shapes = dict(caffe.warm_shapes)
        else:
            self.path = onnx_model_path(config, self.name)
            self._first = self._compile(self.path)
            self.inputs = [_spec(port) for port in self._first.model.inputs]
            self.outputs = [_spec(port) for port in self._first.model.outputs]
        self.native = self._first.model
        # What the plugin really runs in: bf16 / f16 fall back to f32 on a CPU without those units.
        self.inference_precision = self.native.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        asked = self.properties["INFERENCE_PRECISION_HINT"]
        if self.inference_precision != asked:
            logger.warning(
                "OpenVINO runs %s in %s, not %s: this CPU lacks %s units",
                self.path.name if self.path else "the net",
                self.inference_precision,
                asked,
                asked,
            )

    def _compile(self, source: Any) -> Compiled:
        """Compile an ONNX file (a Path) or an onnx.ModelProto converted in memory."""
        core = ov.Core()
        try:
            read = core.read_model(str(source) if isinstance(source, Path) else io.BytesIO(source.SerializeToString()))
            return Compiled(core.compile_model(read, "CPU", self.properties))
        except RuntimeError as exc:
            raise ModelLoadError(
                f"OpenVINO cannot compile {source if isinstance(source, Path) else 'the net'}: {first_line(exc)}"
            ) from None

    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        compiled = self._first if self.plans is None else self.plans.engine({n: a.shape for n, a in feed.items()})
        return compiled.infer(feed, outputs)

    def close(self) -> None:
        if self.plans is not None:
            self.plans.clear()
        self._first.requests = queue.Queue()
        self.native = None


class Compiled:
    """A compiled model and its infer requests: each serves one call at a time, so they
    wait in a queue (one per stream) and a call borrows one."""

    def __init__(self, model: ov.CompiledModel):
        self.model = model
        # A tensor may carry several names (a Caffe blob and the node that wrote it): each finds it.
        self.ports = {name: port for port in model.outputs for name in port.get_names()}
        # OpenVINO drops a graph input that nothing reads (Interp's size-only second bottom).
        self.inputs = {name for port in model.inputs for name in port.get_names()}
        self.requests: queue.Queue[ov.InferRequest] = queue.Queue()
        for _ in range(max(1, int(model.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))):
            self.requests.put(model.create_infer_request())

    def infer(self, feed: Arrays, outputs: list[str]) -> Arrays:
        request = self.requests.get()
        try:
            results = request.infer({n: a for n, a in feed.items() if n in self.inputs}, share_inputs=True)
            return {name: results[self.ports[name]].copy() for name in outputs}
        finally:
            self.requests.put(request)


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
