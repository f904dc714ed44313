"""The `onnxruntime` runtime: ONNX Runtime serving an ONNX model, or a Caffe model converted on load.

model.yaml options it reads:

* `providers`: execution providers in order of preference, short (`tensorrt`, `cuda`,
  `openvino`, `cpu`) or full (`CUDAExecutionProvider`) names. Default: TensorRT, CUDA,
  OpenVINO, CPU, whichever this onnxruntime build has, leaving out the GPU ones when
  `device` is `cpu` (the default): a CPU deployment never lands on a GPU by accident.
  `device: cuda:N` picks the GPU. A provider asked for by name that the build lacks is
  an error listing the ones it has.
* `threads`: ONNX Runtime's intra-op pool (one inter-op thread: one request is one graph run).
* `precision`: fp32; fp16 is the TensorRT provider's `trt_fp16_enable` (the CPU has no
  fp16 kernels, so without TensorRT it is an error, never a silent fp32); int8 loads the
  quantized model (see `_onnx_source.int8_model_path`); bf16 is the openvino runtime's.
* `graph_optimization`: all (default) | extended | basic | disable.
* `shape_cache`: for a Caffe net whose inputs have free dims (any image size), how many
  sessions to keep, one per input shape (runtimes/per_shape.py; default 8).

An InferenceSession is safe to run from several threads at once, so `run` takes no lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..config import ModelConfig
from ..errors import ConfigError, ModelLoadError
from ..paths import cache_dir
from ._onnx_source import onnx_model_path, tensor_spec
from .base import Arrays, Runtime
from .builtin import OnnxRuntimeOptions
from .caffe_model import CaffeModel
from .options import cuda_index
from .per_shape import ShapeCache

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_ORDER = ("tensorrt", "cuda", "openvino", "cpu")
GPU_PROVIDERS = {PROVIDERS["tensorrt"], PROVIDERS["cuda"]}
OPTIMIZATION = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
# onnxruntime tensor type strings -> numpy dtype names
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, config: ModelConfig, caffe: CaffeModel | None = None):
        """`caffe`: serve this Caffe net (e.g. one made in memory) instead of the config's files."""
        self._providers, self._options = choose_providers(config), session_options(config)
        self.plans: ShapeCache[ort.InferenceSession] | None = None
        if caffe is None and config.format == "caffe" and config.options["precision"] != "int8":
            caffe = CaffeModel.from_config(config)
        if caffe is not None:  # one session per input shape (the batch aside)
            bound = OnnxRuntimeOptions.from_config(config).shape_cache
            self.plans = ShapeCache(caffe, self._session, bound, config)
            self.path, self.native = self.plans.path, self.plans.first
            self.inputs, self.outputs = list(caffe.inputs), list(caffe.outputs)
            self.example_shapes = dict(caffe.warm_shapes)
        else:
            self.path = onnx_model_path(config, self.name)
            self.native = self._session(self.path)
            self.inputs = [tensor_spec(i.name, _dtype(i.type), i.shape) for i in self.native.get_inputs()]
            self.outputs = [tensor_spec(o.name, _dtype(o.type), o.shape) for o in self.native.get_outputs()]
        self.providers = self.native.get_providers()

    def _session(self, source: Any) -> ort.InferenceSession:
        """A session on an ONNX file (a Path) or an onnx.ModelProto converted in memory."""
        model = str(source) if isinstance(source, Path) else source.SerializeToString()
        try:
            return ort.InferenceSession(model, self._options, providers=self._providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph...)
            raise ModelLoadError(
                f"onnxruntime cannot load {source if isinstance(source, Path) else 'the net'}: {exc}"
            ) from None

    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        session = self.native if self.plans is None else self.plans.engine({n: a.shape for n, a in feed.items()})
        results = session.run(outputs, feed)
        return dict(zip(outputs, results, strict=True))

    def close(self) -> None:
        if self.plans is not None:
            self.plans.clear()
        self.native = None


def session_options(config: ModelConfig) -> ort.SessionOptions:
    asked = OnnxRuntimeOptions.from_config(config)
    options = ort.SessionOptions()
    options.intra_op_num_threads = asked.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION[asked.graph_optimization]
    return options


def choose_providers(config: ModelConfig) -> list[tuple[str, dict[str, Any]]]:
    """(provider, its options) in the order to try, per the module docstring."""
    options = OnnxRuntimeOptions.from_config(config)  # bf16 is refused there (the openvino runtime's)
    available = ort.get_available_providers()
    device_id = cuda_index(options.device) or 0
    if options.providers is None:
        names = [PROVIDERS[p] for p in DEFAULT_ORDER if PROVIDERS[p] in available]
        if not options.on_cuda:
            names = [n for n in names if n not in GPU_PROVIDERS]
    else:
        names = [PROVIDERS.get(p.lower(), p) for p in options.providers]
        missing = [n for n in names if n not in available]
        if missing:
            raise ConfigError(
                f"{config.source}: field 'options.providers': {missing[0]} is not in this onnxruntime build; "
                f"it has {', '.join(available)}"
            )
    if options.precision == "fp16" and PROVIDERS["tensorrt"] not in names:
        raise ConfigError(
            f"{config.source}: field 'options.precision': fp16 runs on onnxruntime's TensorRT provider, "
            f"which is not in use here (providers: {', '.join(names)}); use fp32, or the openvino runtime"
        )
    return [(name, _provider_options(name, options, device_id)) for name in names]


def _provider_options(name: str, options: OnnxRuntimeOptions, device_id: int) -> dict[str, Any]:
    if name == PROVIDERS["tensorrt"]:
        # Building a TensorRT engine takes minutes: keep it beside the ONNX conversions.
        cache = cache_dir("tensorrt")
        return {
            "device_id": device_id,
            "trt_fp16_enable": options.precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
        }
    if name == PROVIDERS["cuda"]:
        return {"device_id": device_id}
    if name == PROVIDERS["openvino"]:  # f32 unless asked: OpenVINO's CPU default may be bf16
        return {"device_type": "CPU", "precision": "FP32"}
    return {}


def _dtype(onnx_type: str) -> str:
    if onnx_type in _DTYPES:
        return _DTYPES[onnx_type]
    inner = onnx_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype(inner).name if inner else onnx_type
