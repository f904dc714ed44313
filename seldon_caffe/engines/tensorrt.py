"""TensorRT, as both `convert tensorrt` (which builds plans) and the tensorrt runtime (which serves them) load it."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from ..errors import SeldonCaffeError

MIN_VERSION = (8, 6)
TENSORRT_HINT = (
    "install it on a machine with an NVIDIA GPU: `pip install tensorrt` (CUDA 12: `pip install tensorrt-cu12`), "
    "or use NVIDIA's TensorRT container nvcr.io/nvidia/tensorrt; on CPU use the onnxruntime or openvino runtime"
)


def require_tensorrt(error: type[SeldonCaffeError] = SeldonCaffeError) -> ModuleType:
    """`import tensorrt`, or `error` telling the user how to get it."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer does not load
        raise error(f"TensorRT is not installed (import tensorrt: {exc}); {TENSORRT_HINT}") from None
    version = tuple(int(part) for part in tensorrt.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_VERSION:
        raise error(f"TensorRT {tensorrt.__version__} is too old: seldon-caffe needs 8.6 or later; {TENSORRT_HINT}")
    return tensorrt


@functools.cache
def trt_logger() -> Any:
    """One logger per process: TensorRT keeps the first it is given for the whole library."""
    trt = require_tensorrt()
    return trt.Logger(trt.Logger.WARNING)
