"""The `tensorrt` runtime: a TensorRT plan on an NVIDIA GPU.

```yaml
format: tensorrt
files: {plan: model.plan}       # from `seldon-caffe convert tensorrt model.onnx -o model.plan`
options: {device: cuda}         # or cuda:N
```

A plan is an engine compiled for one GPU model by one TensorRT version, so it is built where it
will be served (docs/tensorrt.md). This runtime serves plans only: ONNX (or Caffe) on TensorRT
without a build step is the onnxruntime runtime with `providers: [tensorrt]`.

model.yaml options it reads:

* `device`: cuda or cuda:N. TensorRT runs on NVIDIA GPUs only, so `cpu`, the default of every
  model.yaml, is an error saying to set it: a model never lands on a GPU unasked.
* `precision`: fixed when the plan is built (`--precision`); any other value here is logged as
  ignored, never silently taken as the plan's.

Dimensions the plan leaves dynamic (the batch) are -1 in the signature, and a request outside
the plan's optimization profile (a batch above `--max-batch`) is a 400 naming the range;
`batch_range` gives it to hooks that split large requests.

Memory and threads: buffers are torch CUDA tensors and runs go on a torch CUDA stream. torch is
the CUDA library this project already ships with; TensorRT's Python API takes device pointers
and allocates nothing itself. An execution context is not thread-safe, so `run` holds a lock
for a whole request (copy in, execute, copy out): one request at a time per process. For
concurrency on one GPU, run more server workers, each with its own engine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..engines.tensorrt import require_tensorrt, trt_logger
from ..errors import BadRequest, ConfigError, ModelLoadError, SeldonCaffeError, Unsupported
from ._onnx_source import tensor_spec
from .base import Arrays, Runtime, TensorSpec

logger = logging.getLogger(__name__)

# trt.DataType member name -> numpy dtype name (torch spells them the same)
DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "BOOL": "bool",
}


class TensorRTRuntime(Runtime):
    name = "tensorrt"

    def __init__(self, config: ModelConfig):
        # Everything checkable without TensorRT first: those mistakes show on any machine.
        self.path = plan_path(config)
        check_gpu_device(config)
        if config.options["precision"] != "fp32":
            logger.warning(
                "%s: options.precision %s is ignored: a TensorRT plan's precision is fixed when it is built "
                "(seldon-caffe convert tensorrt --precision)",
                config.source,
                config.options["precision"],
            )
        trt = require_tensorrt(ModelLoadError)
        torch, self.device = _cuda_torch(str(config.options["device"]))
        self._torch = torch
        try:
            plan = self.path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read the TensorRT plan {self.path}: {exc.strerror or exc}") from None
        with torch.cuda.device(self.device):
            self._trt_runtime = trt.Runtime(trt_logger())
            self.native = self._trt_runtime.deserialize_cuda_engine(plan)
            if self.native is None:
                raise ModelLoadError(
                    f"TensorRT {trt.__version__} cannot load the plan {self.path} (its log above says why): a plan "
                    f"loads only with the TensorRT version and GPU model it was built with; rebuild it here with "
                    f"seldon-caffe convert tensorrt"
                )
            self._context = self.native.create_execution_context()
            self._stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()
        self.inputs, self.outputs, self.profiles, self._dtypes = engine_signature(trt, self.native)

    @property
    def batch_range(self) -> tuple[int, int] | None:
        """(smallest, largest) batch the plan takes, None when its batch is fixed."""
        ranges = [(low[0], high[0]) for low, high in self.profiles.values() if low]
        return (max(r[0] for r in ranges), min(r[1] for r in ranges)) if ranges else None

    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        for name, array in feed.items():
            if name in self.profiles:
                problem = profile_problem(name, array.shape, *self.profiles[name])
                if problem:
                    raise BadRequest(problem)
        with self._lock:
            if self.native is None:
                raise SeldonCaffeError(f"the tensorrt runtime for {self.path} is closed")
            return self._execute(feed, outputs)

    def _execute(self, feed: Arrays, outputs: list[str]) -> Arrays:
        """One run on the stream: inputs to the GPU, shapes set, outputs allocated, execute, back."""
        torch, context = self._torch, self._context
        buffers = {}
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            for name, array in feed.items():
                host = np.require(array.astype(self._dtypes[name], copy=False), requirements=["C", "W"])
                buffers[name] = torch.from_numpy(host).to(self.device)
                if not context.set_input_shape(name, tuple(array.shape)):
                    raise BadRequest(f"TensorRT refused shape {list(array.shape)} for input {name!r}")
                context.set_tensor_address(name, buffers[name].data_ptr())
            for spec in self.outputs:  # TensorRT writes every output, asked for or not
                shape = tuple(context.get_tensor_shape(spec.name))
                if any(size < 0 for size in shape):
                    raise Unsupported(
                        f"output {spec.name!r} has a data-dependent shape, which this runtime cannot size"
                    )
                buffers[spec.name] = torch.empty(
                    shape, dtype=getattr(torch, self._dtypes[spec.name]), device=self.device
                )
                context.set_tensor_address(spec.name, buffers[spec.name].data_ptr())
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise SeldonCaffeError(f"TensorRT failed to run {self.path} (its log above says why)")
            self._stream.synchronize()
            return {name: buffers[name].cpu().numpy() for name in outputs}

    def close(self) -> None:
        with self._lock:  # not while a run is on the GPU; context before engine before runtime
            self._context = None
            self.native = None
            self._trt_runtime = None


def plan_path(config: ModelConfig) -> Path:
    """The plan file; other formats get the command that makes one."""
    if config.format == "tensorrt":
        return config.files["plan"]
    onnx = "model.onnx" if config.format == "caffe" else config.files["onnx"].name
    first = "seldon-caffe convert caffe ... -o model.onnx, then " if config.format == "caffe" else ""
    raise ModelLoadError(
        f"{config.source}: the tensorrt runtime serves TensorRT plans (format: tensorrt, files: {{plan: model.plan}}), "
        f"not format {config.format}: build one with {first}seldon-caffe convert tensorrt {onnx} -o model.plan; "
        f"or run the ONNX model on TensorRT with runtime onnxruntime and options.providers: [tensorrt]"
    )


def check_gpu_device(config: ModelConfig) -> None:
    """options.device must name a GPU (config.py already checked it is cpu, cuda or cuda:N)."""
    if str(config.options["device"]) == "cpu":
        raise ConfigError(
            f"{config.source}: field 'options.device': cpu; TensorRT runs on NVIDIA GPUs only: set device: cuda "
            f"(or cuda:N), or serve the ONNX model on CPU with runtime onnxruntime or openvino"
        )


def _cuda_torch(device: str) -> tuple[ModuleType, Any]:
    """(torch, the torch.device of options.device): the runtime keeps its buffers in torch CUDA tensors."""
    try:  # through the torch runtime's module, which imports torch the safe way (engines.torch.import_torch)
        from .torch import torch, torch_device
    except ImportError:
        raise ModelLoadError(
            "the tensorrt runtime keeps its GPU buffers in torch CUDA tensors and torch is not installed: "
            "pip install 'seldon-caffe[torch]'"
        ) from None
    return torch, torch_device(device)


def engine_signature(
    trt: ModuleType, engine: Any
) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, tuple[tuple[int, ...], tuple[int, ...]]], dict[str, str]]:
    """(inputs, outputs, {dynamic input: (min shape, max shape) of profile 0}, {tensor: numpy dtype})."""
    inputs, outputs, profiles, dtypes = [], [], {}, {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtypes[name] = numpy_dtype(engine.get_tensor_dtype(name).name, name)
        spec = tensor_spec(name, dtypes[name], tuple(engine.get_tensor_shape(name)))
        if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
            outputs.append(spec)
            continue
        inputs.append(spec)
        if -1 in spec.shape:
            low, _opt, high = engine.get_tensor_profile_shape(name, 0)
            profiles[name] = (tuple(low), tuple(high))
    return inputs, outputs, profiles, dtypes


def numpy_dtype(trt_type: str, tensor: str) -> str:
    """The numpy dtype name of a trt.DataType member name (FLOAT -> float32)."""
    if trt_type not in DTYPES:
        raise ModelLoadError(
            f"tensor {tensor!r} of the plan has TensorRT type {trt_type}, which numpy cannot hold; "
            f"rebuild the plan with {', '.join(DTYPES.values())} inputs and outputs"
        )
    return DTYPES[trt_type]


def profile_problem(name: str, shape: Sequence[int], low: Sequence[int], high: Sequence[int]) -> str | None:
    """Why `shape` is outside the profile's [low, high] for input `name`, or None when it fits."""
    for axis, (size, lo, hi) in enumerate(zip(shape, low, high, strict=True)):
        if not lo <= size <= hi:
            what = "batch" if axis == 0 else f"dimension {axis}"
            advice = " (split the request, or rebuild the plan with a larger --max-batch)" if axis == 0 else ""
            return f"input {name!r} has {what} {size}; this TensorRT plan takes {lo} to {hi}{advice}"
    return None
