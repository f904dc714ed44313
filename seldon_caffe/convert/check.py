"""Check a converted ONNX model against the framework it came from, on random inputs.

A conversion that loads is not yet a conversion that answers the same: an op mapped with
the wrong layout or a folded constant of the wrong dtype still produces a valid file. So
every framework converter ends here: the same random inputs (from config.txt) go through
ONNX Runtime and through the source framework, and each output's error is reported. The
measure is the project's one (seldon_caffe/faithfulness.py), max|onnx - source| / max|source|,
so one tolerance means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engines.description import ModelDescription
from ..errors import SeldonCaffeError
from ..faithfulness import relative_error

Arrays = dict[str, np.ndarray]
DEFAULT_TOLERANCE = 1e-4


class ConversionMismatch(SeldonCaffeError):
    """The ONNX model was written but does not answer like its source."""


@dataclass(frozen=True)
class OutputError:
    name: str
    max_abs: float
    relative: float


def random_inputs(description: ModelDescription, batch: int, seed: int = 0) -> Arrays:
    """One random array per described input, at `batch` where config.txt has a batch axis."""
    rng = np.random.default_rng(seed)
    batch = batch if description.batch_size else 1
    return {t.name: t.random(rng, batch) for t in description.inputs}


def check_batch(description: ModelDescription) -> int:
    """Check at batch 2 where the batch may vary: it catches a batch size baked into the graph."""
    return min(2, description.batch_size) if description.batch_size else 1


def compare_outputs(source: Arrays, converted: Arrays) -> list[OutputError]:
    errors = []
    for name, want in source.items():
        got = converted.get(name)
        if got is None:
            raise ConversionMismatch(f"output {name!r}: the ONNX model does not give it (it gives {sorted(converted)})")
        if got.shape != want.shape:
            raise ConversionMismatch(
                f"output {name!r}: ONNX gives shape {list(got.shape)}, the source {list(want.shape)}"
            )
        finite = np.isfinite(want) & np.isfinite(got)
        max_abs = float(np.max(np.abs(got[finite].astype(np.float64) - want[finite]), initial=0.0))
        errors.append(OutputError(name, max_abs, relative_error(got, want)))
    return errors


def run_onnx(path: Path, inputs: Arrays) -> Arrays:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def check_conversion(
    onnx_path: Path,
    description: ModelDescription,
    source: Callable[[Arrays], Arrays],
    framework: str,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[OutputError]:
    """Run both on the same random inputs; ConversionMismatch when an output is off by more than `tolerance`."""
    inputs = random_inputs(description, check_batch(description))
    want = source(inputs)
    errors = compare_outputs(want, run_onnx(onnx_path, inputs))
    worst = max(errors, key=lambda e: e.relative)
    if worst.relative > tolerance:
        raise ConversionMismatch(
            f"{onnx_path} was written, but its output {worst.name!r} differs from {framework} by "
            f"{worst.relative:.3g} (relative; max abs {worst.max_abs:.3g}) > tolerance {tolerance:g} "
            f"on random inputs. Check the model, or pass --tolerance to accept it."
        )
    return errors


def format_errors(errors: list[OutputError], framework: str) -> str:
    parts = [f"{e.name} {e.relative:.2g} (max abs {e.max_abs:.2g})" for e in errors]
    return f"max error against {framework} on random inputs, relative: " + ", ".join(parts)


def check_signature(onnx_path: Path, description: ModelDescription) -> None:
    """The written model's inputs and outputs are the ones config.txt names, with its dtypes."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    where = description.where
    for kind, values, described in (
        ("input", graph.input, description.inputs),
        ("output", graph.output, description.outputs),
    ):
        found = {v.name: v.type.tensor_type for v in values}
        for tensor in described:
            if tensor.name not in found:
                raise ConversionMismatch(f"{onnx_path}: no {kind} {tensor.name!r}; it has {', '.join(found)}")
            dtype = helper.tensor_dtype_to_np_dtype(found[tensor.name].elem_type).name
            if dtype != tensor.dtype:
                raise ConversionMismatch(
                    f"{where}: {kind} {tensor.name!r} is {tensor.dtype}, but the model's is {dtype}; fix its data_type"
                )
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in found[tensor.name].shape.dim]
            if len(dims) != len(tensor.dims) or any(
                -1 not in (a, b) and a != b for a, b in zip(dims, tensor.dims, strict=False)
            ):
                raise ConversionMismatch(
                    f"{where}: {kind} {tensor.name!r} has dims {list(tensor.dims)}, but the model's are {dims} "
                    f"(-1: any size); fix its dims"
                )
