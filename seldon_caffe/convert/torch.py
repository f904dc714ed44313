"""`seldon-caffe convert torch`: a PyTorch model plus config.txt to ONNX, through torch.onnx.

PyTorch models reach us in four shapes, told apart by what is inside the file (every
torch file is a zip archive) rather than by its name:

* a TorchScript archive (`torch.jit.save`): exported with torch's TorchScript-based
  exporter, the only one that takes a ScriptModule;
* an ExportedProgram (`torch.export.save`, `.pt2`): exported with the dynamo exporter;
* a state_dict plus `--class module:Name` (the class, or any function returning the
  module, called without arguments): the safe way to ship plain PyTorch weights;
* a whole pickled module (`torch.save(model)`): unpickling runs code from the file, so it
  is loaded only without `--class`, and with a warning.

config.txt lists the inputs in `forward`'s order and the outputs in the order `forward`
returns them (PyTorch names neither), and every -1 in its dims becomes a dynamic axis.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

from ..engines.description import ModelDescription, load_description
from ..engines.torch import import_torch, load_saved, torch_file_kind
from ..errors import SeldonCaffeError
from . import _Subparsers, add_tolerance, opset_type
from .check import (
    DEFAULT_TOLERANCE,
    OutputError,
    check_batch,
    check_conversion,
    check_signature,
    format_errors,
    random_inputs,
)

# One ONNX file holds at most 2 GB (a protobuf limit); bigger models keep their weights in a
# .data file beside it. Smaller ones stay one self-contained file, easy to copy and mount.
PROTOBUF_LIMIT = 2**31 - 2**26
PICKLE_WARNING = (
    "{path} is a pickled module: loading it runs code stored in the file. Load only files you trust; "
    "prefer TorchScript (torch.jit.save), an ExportedProgram (torch.export.save) or a state_dict with --class."
)


def add_parser(formats: _Subparsers) -> None:
    parser = formats.add_parser(
        "torch",
        help="PyTorch model + config.txt -> ONNX (torch.onnx), checked against PyTorch",
        description="Convert a TorchScript file, an ExportedProgram, a pickled module, or a state_dict "
        "with --class, to ONNX with the inputs and outputs config.txt describes (docs/convert.md).",
    )
    parser.add_argument("model", type=Path, help="the PyTorch file (.pt, .pth, .pt2)")
    parser.add_argument("--config", type=Path, required=True, help="config.txt: the model description")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    add_class_option(parser)
    parser.add_argument("--opset", type=opset_type, help="ONNX opset (default: the exporter's)")
    add_tolerance(parser)
    parser.set_defaults(handler=convert_torch_command)


def add_class_option(parser: argparse.ArgumentParser) -> None:
    """--class, for PyTorch files that hold a state_dict (here and in `convert triton`)."""
    parser.add_argument(
        "--class",
        dest="class_spec",
        metavar="MODULE:NAME",
        help="for a state_dict: the module class (or factory) to load it into, e.g. torchvision.models:resnet50",
    )


def convert_torch_command(args: argparse.Namespace) -> int:
    from ..paths import check_output_path

    check_output_path(args.output)
    description = load_description(args.config)
    started = time.perf_counter()
    model = load_torch_model(args.model, args.class_spec)
    errors = torch_to_onnx(model, description, args.output, opset=args.opset, tolerance=args.tolerance)
    print(f"wrote {args.output} ({time.perf_counter() - started:.1f} s)")
    print(format_errors(errors, "PyTorch"))
    return 0


def load_torch_model(path: Path, class_spec: str | None = None) -> Any:
    """The model in `path`, in eval mode: a ScriptModule, an ExportedProgram or an nn.Module."""
    from ..extras import require_modules

    require_modules("torch", "onnx", "onnxruntime")
    torch = import_torch()

    kind = torch_file_kind(path)
    if kind != "pickle":
        return load_saved(path, kind)
    if class_spec:
        return _module_with_state(path, class_spec)
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # UnpicklingError and friends: not plain tensors, so a pickled module
        print(f"seldon-caffe: warning: {PICKLE_WARNING.format(path=path)}", file=sys.stderr)
        loaded = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(loaded, dict):
        raise SeldonCaffeError(f"{path} holds a state_dict (weights only): pass --class MODULE:NAME to load it into")
    if not isinstance(loaded, torch.nn.Module):
        raise SeldonCaffeError(f"{path} holds a {type(loaded).__name__}, not a torch.nn.Module")
    return loaded.eval()


def _module_with_state(path: Path, class_spec: str) -> Any:
    import torch

    factory = import_object(class_spec, search=path.parent)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SeldonCaffeError(f"{path}: not a state_dict that loads without unpickling code ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the weights
    if not isinstance(state, dict):
        raise SeldonCaffeError(f"{path}: --class given, but the file holds a {type(state).__name__}, not a state_dict")
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise SeldonCaffeError(f"{class_spec}() returned a {type(module).__name__}, not a torch.nn.Module")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
        raise SeldonCaffeError(f"{path} does not fit {class_spec}: {exc}") from None
    return module.eval()


def import_object(spec: str, search: Path | None = None) -> Any:
    """`package.module:Name` -> the object. `search` (the model's directory) and the current
    directory are importable, so a model definition beside the weights is found."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SeldonCaffeError(f"--class {spec!r}: expected MODULE:NAME, e.g. torchvision.models:resnet50")
    for directory in (str(search) if search else None, ""):
        if directory is not None and directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise SeldonCaffeError(f"--class {spec!r}: cannot import {module_name}: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise SeldonCaffeError(f"--class {spec!r}: {module_name} has no {attribute}")
        target = getattr(target, part)
    return target


def torch_to_onnx(
    model: Any,
    description: ModelDescription,
    output: Path,
    *,
    opset: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[OutputError]:
    """Write the ONNX export of `model` to `output`; return each output's error against PyTorch."""
    torch = import_torch()

    examples = random_inputs(description, check_batch(description), seed=1)
    args = tuple(torch.from_numpy(array) for array in examples.values())
    names = {"input_names": list(examples), "output_names": [t.name for t in description.outputs]}
    try:
        if isinstance(model, torch.jit.ScriptModule):
            torch.onnx.export(
                model, args, str(output), dynamo=False, opset_version=opset, **names, **_axes(description)
            )
        else:
            dynamic = None if isinstance(model, torch.export.ExportedProgram) else _dynamic_shapes(description)
            torch.onnx.export(
                model,
                args,
                str(output),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic,
                external_data=_weight_bytes(model) >= PROTOBUF_LIMIT,
                **names,
            )
    except Exception as exc:  # the exporters raise many types; the message is what helps
        raise SeldonCaffeError(f"torch.onnx could not export the model: {type(exc).__name__}: {exc}") from None
    check_signature(output, description)
    return check_conversion(output, description, _reference(model, description), "PyTorch", tolerance)


def _weight_bytes(model: Any) -> int:
    import torch

    state = model.state_dict if isinstance(model, torch.export.ExportedProgram) else model.state_dict()
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def _axes(description: ModelDescription) -> dict[str, Any]:
    """TorchScript exporter: every -1 in config.txt is a named dynamic axis."""
    axes = {}
    for tensor in description.inputs + description.outputs:
        free = {i: _axis_name(tensor.name, i, description) for i, d in enumerate(tensor.dims) if d == -1}
        if free:
            axes[tensor.name] = free
    return {"dynamic_axes": axes}


def _dynamic_shapes(description: ModelDescription) -> tuple[dict[int, Any], ...]:
    """Dynamo exporter: one Dim per -1 in config.txt, the batch axis shared by every input."""
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes = []
    for tensor in description.inputs:
        axes = {}
        for i, d in enumerate(tensor.dims):
            if d == -1:
                name = _axis_name(tensor.name, i, description)
                axes[i] = dims.setdefault(name, Dim(name))
        shapes.append(axes)
    return tuple(shapes)


def _axis_name(tensor: str, axis: int, description: ModelDescription) -> str:
    return "batch" if axis == 0 and description.batch_size else f"{tensor}_{axis}"


def _reference(model: Any, description: ModelDescription):
    """{input name: array} -> {output name: array} through PyTorch itself."""
    import torch

    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model

    def run(arrays: dict) -> dict:
        with torch.no_grad():  # not inference_mode: scripted modules with parameters refuse it
            result = module(*(torch.from_numpy(a) for a in arrays.values()))
        values = list(result.values()) if isinstance(result, dict) else result
        values = list(values) if isinstance(values, (tuple, list)) else [values]
        if len(values) != len(description.outputs):
            raise SeldonCaffeError(
                f"the model returns {len(values)} outputs, {description.where} describes {len(description.outputs)}"
            )
        return {t.name: v.detach().numpy() for t, v in zip(description.outputs, values, strict=True)}

    return run
