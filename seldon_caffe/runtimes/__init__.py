"""Runtimes: one module per engine, all behind `base.Runtime`.

Modules are imported only when chosen, so a missing optional engine (openvino, torch...)
costs nothing until a model.yaml asks for it, and then fails with an install hint.

Which runtimes there are is the registry's (registry.py): each runtime declares its
formats, whether `auto` may choose it, its install hint and its options class (options.py),
without importing its engine; the built-ins do in builtin.py, other packages through the
`seldon_caffe.runtimes` entry point group. REGISTRY maps a name to that declaration.

A Caffe net need not come from a model directory: `load_caffe_runtime` serves a CaffeNet
built in memory (a part of a net cut at its Python layers, say) on any Caffe runtime.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import ModelLoadError
from .base import Runtime, TensorSpec
from .options import Options
from .registry import REGISTRY, RuntimeSpec, check_option_keys, declaration, default_runtime, register_runtime

if TYPE_CHECKING:  # not imported at run time: config.py imports the registry from here
    from collections.abc import Mapping, Sequence

    from ..caffe import CaffeNet
    from ..config import ModelConfig

__all__ = [
    "REGISTRY",
    "Options",
    "Runtime",
    "RuntimeSpec",
    "TensorSpec",
    "load_caffe_runtime",
    "load_runtime",
    "register_runtime",
    "resolve_runtime",
    "runtime_class",
]


# Set by s2i/Dockerfile(.gpu) to the EXTRAS the builder image was built with.
IMAGE_EXTRAS_ENV = "SELDON_CAFFE_IMAGE_EXTRAS"


def resolve_runtime(config: ModelConfig) -> str:
    """The runtime `auto` stands for, given what is installed (DESIGN.md, model.yaml)."""
    if config.runtime != "auto":
        return config.runtime
    if _measured_by_auto(config):
        from .auto import resolve as resolve_auto  # the measured choice (runtimes/auto.py)

        return resolve_auto(config)
    if config.format == "caffe":
        return "pycaffe"
    return default_runtime(config.format)  # every other format has one runtime `auto` means


def _measured_by_auto(config: ModelConfig) -> bool:
    """`auto` for a Caffe net with no pycaffe here (no `import caffe`, no pycaffe_command):
    runtimes/auto.py measures the engines and serves the fastest faithful one."""
    if config.runtime != "auto" or config.format != "caffe":
        return False
    return not (_importable("caffe") or config.options.get("pycaffe_command"))


def runtime_class(name: str) -> type[Runtime]:
    """The class of runtime `name`, importing its module (and engine) now."""
    declared = declaration(name)
    try:
        return declared.load_class()
    except ImportError as exc:
        raise ModelLoadError(f"runtime {name!r} is not available: {exc} ({install_hint(declared.install)})") from None


def install_hint(install: str) -> str:
    """How to get an engine that is not installed: pip's words, or, inside one of our builder
    images (s2i/Dockerfile sets IMAGE_EXTRAS_ENV), the EXTRAS to build the builder with."""
    image_extras = os.environ.get(IMAGE_EXTRAS_ENV)
    wanted = re.fullmatch(r"seldon-caffe\[([\w,-]+)\]", install)
    if image_extras is None or wanted is None:
        return f"install {install}"
    extras = [e for e in image_extras.split(",") if e]
    extras += [e for e in wanted.group(1).split(",") if e not in extras]
    return f"this image has EXTRAS={image_extras}: build the builder with --build-arg EXTRAS={','.join(extras)}"


def load_runtime(config: ModelConfig) -> Runtime:
    """Load the model of `config` with the runtime it names (or `auto` resolves to)."""
    check_option_keys(config)  # a misspelt option stops start-up before any engine loads
    if _measured_by_auto(config):
        from .auto import load_fastest

        return load_fastest(config, _load_named)
    return _load_named(config, resolve_runtime(config))


def load_caffe_runtime(
    name: str,
    config: ModelConfig,
    net: CaffeNet,
    inputs: Mapping[str, Sequence[int]] | None = None,
    outputs: Sequence[str] | None = None,
) -> Runtime:
    """Serve `net` (a CaffeNet with weights, made in memory) with Caffe runtime `name`
    (opencv, onnxruntime, openvino, torch, pycaffe) and `config`'s options (threads,
    precision, device, shape_cache...; its inputs, outputs and files are not used).

    `inputs` {input: shape} fixes (a number) or frees (-1) input dims, and its numbers are
    the warm-up size; by default the net decides which dims are free, as for a model
    directory (runtimes/caffe_model.py). `outputs`: the blobs to answer, any of the net's
    (default: its unconsumed tops). The runtime takes any size the net accepts, converting
    per input shape where its engine needs that, and its conversions stay in memory.
    """
    from .caffe_model import CaffeModel

    config = replace(config, inputs=None, outputs=None)
    options = declaration(name).options.from_config(config)
    runtime = runtime_class(name)(config, caffe=CaffeModel.from_net(net, inputs, outputs))  # type: ignore[call-arg]
    runtime.allow_non_finite = options.allow_non_finite
    return runtime


def _load_named(config: ModelConfig, name: str) -> Runtime:
    options = declaration(name).options.from_config(config)  # checked before the engine is imported
    runtime = _around_python_layers(config, name) or runtime_class(name)(config)
    _apply_signature_overrides(runtime, config)
    runtime.allow_non_finite = options.allow_non_finite
    return runtime


def _around_python_layers(config: ModelConfig, name: str) -> Runtime | None:
    """A Caffe net with Python layers on an engine: cut at those layers, each part on the
    engine, the layers' code in this process (runtimes/segmented.py). pycaffe runs it whole."""
    if name == "pycaffe" or config.format != "caffe":
        return None
    from .segmented import SegmentedRuntime, has_python_layers

    if not has_python_layers(config):
        return None
    if "caffe" not in inspect.signature(runtime_class(name)).parameters:  # it cannot serve a net made in memory
        raise ModelLoadError(
            f"{config.source}: runtime {name} cannot serve a net with Python layers; "
            "use opencv, onnxruntime, openvino, torch, or pycaffe (which runs the whole net in your Caffe)"
        )
    return SegmentedRuntime(config, name)


def _apply_signature_overrides(runtime: Runtime, config: ModelConfig) -> None:
    """model.yaml's inputs/outputs refine what the runtime found (e.g. a fixed batch size).
    For a Caffe net, `outputs` selects: the runtimes answer exactly the blobs it names, in
    its order (any blob of the net: runtimes/caffe_model.py)."""
    for key in ("inputs", "outputs"):
        overrides = getattr(config, key)
        if not overrides:
            continue
        specs = {s.name: s for s in getattr(runtime, key)}
        for override in overrides:
            name = override["name"]
            if name not in specs:
                raise ModelLoadError(
                    f"{config.source}: field '{key}': the model has no {key[:-1]} {name!r}; "
                    f"it has {', '.join(specs) or 'none'}"
                )
            spec = specs[name]
            specs[name] = replace(
                spec,
                dtype=override.get("dtype", spec.dtype),
                shape=tuple(override.get("shape", spec.shape)),
            )
        if key == "outputs" and config.format == "caffe":
            specs = {override["name"]: specs[override["name"]] for override in overrides}
        setattr(runtime, key, list(specs.values()))


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken install is as good as none for `auto`
        return False
    return True
