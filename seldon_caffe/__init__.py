"""seldon-caffe: serve Caffe (and ONNX, TensorFlow, PyTorch) models as Seldon Core microservices.

`seldon-core-microservice seldon_caffe.SeldonCaffeModel` imports the class from here. It is
loaded lazily so that the Caffe format, the runtimes and the command work without importing
Seldon (and its Flask/gRPC stack) until a service is actually started; `decode_image`, for
hooks, likewise waits for its first use to import OpenCV and Pillow.
"""

from __future__ import annotations

from typing import Any

from .errors import BadRequest

__all__ = ["BadRequest", "SeldonCaffeModel", "decode_image"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "SeldonCaffeModel":
        from .model import SeldonCaffeModel

        return SeldonCaffeModel
    if name == "decode_image":
        from .images import decode_image

        return decode_image
    raise AttributeError(f"module 'seldon_caffe' has no attribute {name!r}")
