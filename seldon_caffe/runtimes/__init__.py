"""Runtimes: one module per engine, all behind `base.Runtime`.

Modules are imported only when chosen, so a missing optional engine (openvino, torch...)
costs nothing until a model.yaml asks for it, and then fails with an install hint.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

from ..config import ModelConfig
from ..errors import ModelLoadError
from .base import Runtime, TensorSpec

# runtime name -> (module, class, pip extra that installs its engine)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "opencv": ("opencv", "OpenCVRuntime", "opencv-python-headless"),
    "pycaffe": ("pycaffe", "PycaffeRuntime", "caffe (Debian python3-caffe or conda)"),
    "onnxruntime": ("onnxruntime", "OnnxRuntime", "seldon-caffe[onnx]"),
    "openvino": ("openvino", "OpenVinoRuntime", "seldon-caffe[openvino]"),
    "tensorflow": ("tensorflow", "TensorFlowRuntime", "seldon-caffe[tensorflow]"),
    "torch": ("torch", "TorchRuntime", "seldon-caffe[torch]"),
    "tensorrt": ("tensorrt", "TensorRTRuntime", "tensorrt (NVIDIA)"),
}

__all__ = ["Runtime", "TensorSpec", "load_runtime", "resolve_runtime", "REGISTRY"]


def resolve_runtime(config: ModelConfig) -> str:
    """The runtime `auto` stands for, given what is installed (DESIGN.md, model.yaml)."""
    if config.runtime != "auto":
        return config.runtime
    if config.format == "caffe":
        if _importable("caffe"):
            return "pycaffe"
        if config.options.get("pycaffe_command"):
            return "pycaffe"
        return "opencv"
    return {"onnx": "onnxruntime", "tensorflow": "tensorflow", "torch": "torch", "tensorrt": "tensorrt"}[config.format]


def runtime_class(name: str) -> type[Runtime]:
    module_name, class_name, install = REGISTRY[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        raise ModelLoadError(f"runtime {name!r} is not available: {exc} (install {install})") from None
    return getattr(module, class_name)


def load_runtime(config: ModelConfig) -> Runtime:
    """Load the model of `config` with the runtime it names (or `auto` resolves to)."""
    name = resolve_runtime(config)
    runtime = runtime_class(name)(config)
    _apply_signature_overrides(runtime, config)
    runtime.allow_non_finite = bool(config.options.get("allow_non_finite", False))
    return runtime


def _apply_signature_overrides(runtime: Runtime, config: ModelConfig) -> None:
    """model.yaml's inputs/outputs refine what the runtime found (e.g. a fixed batch size)."""
    for key in ("inputs", "outputs"):
        overrides = getattr(config, key)
        if not overrides:
            continue
        specs = {s.name: s for s in getattr(runtime, key)}
        for override in overrides:
            name = override["name"]
            if name not in specs:
                raise ModelLoadError(
                    f"{config.source}: field '{key}': the model has no {key[:-1]} {name!r}; it has {', '.join(specs)}"
                )
            spec = specs[name]
            specs[name] = replace(
                spec,
                dtype=override.get("dtype", spec.dtype),
                shape=tuple(override.get("shape", spec.shape)),
            )
        setattr(runtime, key, list(specs.values()))


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken install is as good as none for `auto`
        return False
    return True
