"""The torch runtime's signature: what goes in and out of a module that records no names.

A TorchScript file names no inputs and records no shapes: they come from model.yaml
`inputs:`, else dl_inference's config.txt beside it, else (ExportedProgram only) the
program's own input metadata. Outputs named nowhere are `o`, `o0, o1...` or a dict's keys,
found by running the model (runtimes/torch.py's warm-up). model.yaml refines these by name,
or renames them all in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from ..config import ModelConfig
from ..engines.description import FILE_NAME as DESCRIPTION_FILE
from ..engines.torch import import_torch
from ..errors import ConfigError, ModelLoadError
from .base import TensorSpec

if TYPE_CHECKING:
    import torch
else:
    torch = import_torch()

_SIGNATURE_EXAMPLE = "inputs: [{name: image, dtype: float32, shape: [-1, 3, 224, 224]}]"


def input_specs(config: ModelConfig, found: list[dict[str, Any]] | None, path: Path) -> list[TensorSpec]:
    """model.yaml `inputs` over those `found` (config.txt's, the ExportedProgram's or the Caffe
    net's); in forward()'s order."""
    entries = merge(found, config.inputs, "inputs", config)
    if not entries:
        raise ModelLoadError(
            f"{path}: a TorchScript file records no input names or shapes; add them to {config.source} in "
            f"forward()'s argument order (-1 = any size), e.g. {_SIGNATURE_EXAMPLE}, or put dl_inference's "
            f"{DESCRIPTION_FILE} beside it"
        )
    specs = []
    for i, entry in enumerate(entries):
        if entry.get("shape") is None:
            raise ModelLoadError(
                f"{config.source}: field 'inputs[{i}].shape': required, a TorchScript file records none; "
                f"e.g. {_SIGNATURE_EXAMPLE}"
            )
        dtype = numpy_dtype(entry.get("dtype") or "float32", f"inputs[{i}].dtype", config)
        specs.append(TensorSpec(entry["name"], dtype, tuple(entry["shape"])))
    return specs


def program_inputs(program: Any) -> list[dict[str, Any]] | None:
    """An ExportedProgram's user inputs, from the fake tensors export traced with (symbolic dims -> -1)."""
    nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    entries = []
    for name in program.graph_signature.user_inputs:
        value = nodes[name].meta.get("val") if name in nodes else None
        if not isinstance(value, torch.Tensor) or value.dtype == torch.bfloat16:
            return None  # a non-tensor argument: model.yaml has to say what to send
        shape = [d if isinstance(d, int) else -1 for d in value.shape]
        entries.append({"name": name, "dtype": str(value.dtype).removeprefix("torch."), "shape": shape})
    return entries or None


@overload
def merge(base: list[dict], given: list[dict] | None, key: str, config: ModelConfig) -> list[dict]: ...
@overload
def merge(base: list[dict] | None, given: list[dict] | None, key: str, config: ModelConfig) -> list[dict] | None: ...
def merge(base: list[dict] | None, given: list[dict] | None, key: str, config: ModelConfig) -> list[dict] | None:
    """model.yaml's entries over the model directory's: by name (as load_runtime refines any
    runtime's signature), or, when they use other names, in place of them one for one."""
    if not given:
        return base
    if base is None:
        return [dict(entry) for entry in given]
    names = [entry["name"] for entry in base]
    if all(entry["name"] in names for entry in given):
        by_name = {entry["name"]: dict(entry) for entry in base}
        for entry in given:
            by_name[entry["name"]].update({k: v for k, v in entry.items() if v is not None})
        return list(by_name.values())
    if len(given) != len(base):
        raise ModelLoadError(
            f"{config.source}: field '{key}': {len(given)} entries, but the model has {len(base)} "
            f"({', '.join(names)}): refine them by these names, or rename them all, in order"
        )
    return [{**old, **{k: v for k, v in new.items() if v is not None}} for old, new in zip(base, given, strict=True)]


def output_entries(
    result: Any, description: Any, config: ModelConfig, path: Path
) -> list[tuple[dict, Any, torch.Tensor]]:
    """(entry, key or index that picks it from forward()'s result, its value) per output.

    Unnamed outputs are `o` (one tensor), `o0, o1...` (a tuple or list), the keys (a dict);
    model.yaml refines them by those names, or renames them in order. config.txt's outputs
    are forward()'s results in order, or for a dict, its keys as their node_name.
    """
    found: list[tuple[str, Any, torch.Tensor]]
    if isinstance(result, torch.Tensor):
        found = [("o", None, result)]
    elif isinstance(result, (tuple, list)) and result and all(isinstance(t, torch.Tensor) for t in result):
        found = [(f"o{i}", i, t) for i, t in enumerate(result)]
    elif isinstance(result, Mapping) and result and all(isinstance(t, torch.Tensor) for t in result.values()):
        found = [(str(k), k, t) for k, t in result.items()]
    else:
        raise ModelLoadError(
            f"{path}: forward() returned {type(result).__name__}; the torch runtime serves a tensor, "
            "a tuple or list of tensors, or a dict of them"
        )
    if description is None:
        entries = merge([{"name": name, "key": key} for name, key, _ in found], config.outputs, "outputs", config)
        return [(entry, entry["key"], value) for entry, (_, _, value) in zip(entries, found, strict=True)]
    entries = merge(described_entries(description.outputs), config.outputs, "outputs", config)
    if isinstance(result, Mapping):
        missing = [entry["key"] for entry in entries if entry["key"] not in result]
        if missing:
            raise ModelLoadError(f"{path}: forward() returns a dict without {missing[0]!r}; it has {', '.join(result)}")
        return [(entry, entry["key"], result[entry["key"]]) for entry in entries]
    if len(entries) != len(found):
        names = ", ".join(entry["name"] for entry in entries)
        raise ModelLoadError(
            f"{path}: forward() returns {len(found)} tensor(s), but {DESCRIPTION_FILE} names {len(entries)} "
            f"output(s) ({names}); name every one, in order"
        )
    return [(entry, key, value) for entry, (_, key, value) in zip(entries, found, strict=True)]


def described_entries(tensors: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "key": t.node_name, "dtype": t.dtype, "shape": list(t.dims)} for t in tensors]


def numpy_dtype(name: str, field: str, config: ModelConfig) -> str:
    """A dtype name both numpy and torch know, or a ConfigError naming the field."""
    try:
        dtype = np.dtype(name).name
    except TypeError:
        dtype = None
    if dtype is None or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConfigError(f"{config.source}: field '{field}': {name!r} is not a tensor dtype; e.g. float32, int64")
    return dtype
