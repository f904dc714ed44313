"""A Caffe net on the torch runtime: its ONNX conversion rebuilt in torch.fx
(seldon_caffe/caffe/to_torch.py), one module per input shape.

The conversion is the one the onnxruntime and openvino runtimes load and cache (converted
once per prototxt and caffemodel, never written beside the user's files), so the three
engines answer the same blobs under the same names. It bakes the spatial sizes in, so a net
with free input dims gets one GraphModule per input shape (runtimes/per_shape.py): the torch
runtime calls `PerShapeModule` as it would call one module, and `.to(...)` (a device, a
reduced precision, channels_last) reaches every module, built or to come.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .caffe_model import CaffeModel
from .per_shape import ShapeCache

if TYPE_CHECKING:
    import onnx
    import torch

    from ..config import ModelConfig


class PerShapeModule:
    """Stands for the net's torch module: calling it runs the GraphModule planned for the
    inputs' shapes (positional, in the net's input order), building it on first use."""

    def __init__(self, model: CaffeModel, device: torch.device, bound: int, config: ModelConfig | None) -> None:
        self.model = model
        self._device = device
        self._moves: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._lock = threading.Lock()  # .to() against a module being built
        self.plans = ShapeCache(model, self._build, bound, config)

    def __call__(self, *tensors: torch.Tensor) -> Any:
        shapes = {spec.name: tuple(t.shape) for spec, t in zip(self.model.inputs, tensors, strict=True)}
        return self.plans.engine(shapes)(*tensors)

    def to(self, *args: Any, **kwargs: Any) -> PerShapeModule:
        """Like nn.Module.to: applied to the modules built so far, and to each one built later."""
        with self._lock:
            self._moves.append((args, kwargs))
            for module in self.plans.built():
                module.to(*args, **kwargs)
        return self

    def _build(self, source: Path | onnx.ModelProto) -> Any:
        import onnx

        from ..caffe.to_torch import onnx_to_torch

        module = onnx_to_torch(onnx.load(source) if isinstance(source, Path) else source).to(self._device)
        with self._lock:
            for args, kwargs in self._moves:
                module = module.to(*args, **kwargs)
        return module


def load_caffe(
    config: ModelConfig, device: torch.device, bound: int, caffe: CaffeModel | None = None
) -> tuple[Path | None, PerShapeModule, list[dict[str, Any]]]:
    """(the cached ONNX file, or None for a net made in memory; the net as a module on
    `device`; its inputs as model.yaml entries, -1 for the free dims)."""
    caffe = caffe or CaffeModel.from_config(config)
    module = PerShapeModule(caffe, device, bound, config)
    inputs = [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in caffe.inputs]
    return module.plans.path, module, inputs
