"""The V2 (Open Inference) protocol, on MLServer: the route Seldon Core v2 and KServe speak.

`SeldonCaffeRuntime` (runtime.py) is the MLServer model class; codec.py turns V2 tensors into
hook payloads and back; serve.py is what `seldon-caffe serve --protocol v2` runs. The runtime
is imported only when asked for, so the command can say that MLServer is missing instead of
failing on an import.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SeldonCaffeRuntime"]


def __getattr__(name: str) -> Any:
    if name == "SeldonCaffeRuntime":  # what model-settings.json names: seldon_caffe.v2.SeldonCaffeRuntime
        from .runtime import SeldonCaffeRuntime

        return SeldonCaffeRuntime
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
