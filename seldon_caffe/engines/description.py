"""config.txt: dl_inference's model-description file, read and validated.

dl_inference's TIS converter takes a TensorFlow or PyTorch model plus a JSON file that says
what goes in and out, because neither format says it well enough on its own (a SavedModel
names tensors `serving_default_image:0`, a PyTorch model names nothing). We keep the file as
it is:

    {
      "batch_size": 64,
      "input":  [{"name": "image", "data_type": "float32", "dims": [-1, 224, 224, 3],
                  "node_name": "serving_default_image:0"}],
      "output": [{"name": "probs", "data_type": "float32", "dims": [-1, 1000],
                  "node_name": "predictions"}]
    }

* `name`: the tensor's public name: the ONNX file, Triton and every runtime serving the
  model (config.txt beside model.yaml) use it.
* `node_name`: where it lives in the source model: a TensorFlow signature key or tensor, in
  any spelling saved_model_cli prints (`find_signature_entry`); optional for PyTorch, whose
  inputs and outputs are positional (the order of the list is the order of `forward`'s
  arguments and results). Default: `name`.
* `dims`: the shape, batch axis included; -1 is a dimension of any size.
* `data_type`: a numpy name (`float32`), Triton's (`TYPE_FP32`, `FP32`) or TensorFlow's
  (`DT_FLOAT`); dl_inference files wrote all three, so all three are read.
* `batch_size`: the largest batch served (Triton's max_batch_size, TensorRT's largest
  profile). 0 means the model takes no batch axis of its own: dims are used as they are.
  When it is above 0, every tensor's first dim must be -1 (the batch axis).

Every mistake is a DescriptionError naming the file and the entry, like model.yaml's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError

FILE_NAME = "config.txt"

# Every spelling of a dtype the file may use -> numpy dtype name.
_TRITON = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_TENSORFLOW = {
    "DT_BOOL": "bool",
    "DT_UINT8": "uint8",
    "DT_INT8": "int8",
    "DT_INT16": "int16",
    "DT_INT32": "int32",
    "DT_INT64": "int64",
    "DT_HALF": "float16",
    "DT_FLOAT": "float32",
    "DT_DOUBLE": "float64",
}
DTYPES: dict[str, str] = {
    **{name.lower(): dtype for name, dtype in _TRITON.items()},
    **{f"type_{name.lower()}": dtype for name, dtype in _TRITON.items()},
    **{name.lower(): dtype for name, dtype in _TENSORFLOW.items()},
    **{dtype: dtype for dtype in _TRITON.values()},
    "float": "float32",
    "half": "float16",
    "double": "float64",
    "int": "int32",
    "long": "int64",
}
# numpy dtype name -> Triton's DataType enum name (config.pbtxt).
TRITON_TYPES = {dtype: f"TYPE_{name}" for name, dtype in _TRITON.items()}
FIELDS = ("batch_size", "input", "output")
TENSOR_FIELDS = ("name", "data_type", "dims", "node_name")


class DescriptionError(ModelLoadError):
    """config.txt is missing, not JSON, or describes something impossible."""


@dataclass(frozen=True)
class TensorDescription:
    """One `input` or `output` entry: public name, numpy dtype name, dims (-1 = any), source name."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    node_name: str

    @property
    def triton_type(self) -> str:
        return TRITON_TYPES[self.dtype]

    def example_shape(self, batch: int = 1, free: int = 1) -> tuple[int, ...]:
        """A concrete shape: `batch` for a leading -1 (the batch axis), `free` for any other -1."""
        return tuple((batch if i == 0 else free) if d == -1 else d for i, d in enumerate(self.dims))

    def random(self, rng: np.random.Generator, batch: int = 1) -> np.ndarray:
        """Random data of this tensor's shape and dtype: N(0, 1) floats, small non-negative integers."""
        shape = self.example_shape(batch)
        kind = np.dtype(self.dtype).kind
        if kind == "f":
            return rng.standard_normal(shape).astype(self.dtype)
        if kind == "b":
            return rng.integers(0, 2, shape).astype(bool)
        return rng.integers(0, 10, shape).astype(self.dtype)


@dataclass(frozen=True)
class ModelDescription:
    """A validated config.txt."""

    batch_size: int
    inputs: tuple[TensorDescription, ...]
    outputs: tuple[TensorDescription, ...]
    source: Path | None = None

    @property
    def where(self) -> str:
        """The file to name in an error: the one the user passed, not always called config.txt."""
        return str(self.source) if self.source else FILE_NAME

    def input(self, name: str) -> TensorDescription:
        return next(t for t in self.inputs if t.name == name)


@dataclass(frozen=True)
class SignatureEntry:
    """One input or output of a TensorFlow signature: its key and the graph tensors behind it.

    `tensors` holds the names tools print for it, the one `saved_model_cli show` prints first
    (`serving_default_image:0`, `StatefulPartitionedCall_1:1`), then any other (the frozen
    graph's `image:0`, `Identity:0`)."""

    key: str
    tensors: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.key} ({self.tensors[0]})" if self.tensors else self.key


def find_signature_entry(node_name: str, entries: Sequence[SignatureEntry]) -> SignatureEntry | None:
    """The entry a config.txt `node_name` names, in any spelling the user may have copied.

    The key (`image`, `image:0`, `output_0`) or a tensor behind it (`serving_default_image:0`,
    `StatefulPartitionedCall_1:1`), each with or without `:0`. Keys are tried first: a key
    is what the signature calls the tensor, whatever another entry's graph tensor is named."""
    wanted = _indexed(node_name)
    for entry in entries:
        if _indexed(entry.key) == wanted:
            return entry
    return next((e for e in entries if wanted in {_indexed(t) for t in e.tensors}), None)


def _indexed(name: str) -> str:
    # TensorFlow's own rule: a tensor named without `:N` is output 0 of its op.
    _, colon, index = name.rpartition(":")
    return name if colon and index.isdigit() else f"{name}:0"


def unknown_node_name(
    description: ModelDescription,
    kind: str,
    tensor: TensorDescription,
    signature: str,
    entries: Sequence[SignatureEntry],
) -> DescriptionError:
    """The error for a `node_name` no entry of `signature` ("signature 'serving_default' of DIR") answers to."""
    names = ", ".join(entry.label() for entry in entries) or "none"
    return DescriptionError(
        f"{description.where}: {kind} {tensor.name!r}: node_name {tensor.node_name!r} is not in {signature}; "
        f"its {kind}s are {names}"
    )


def load_description(path: str | Path) -> ModelDescription:
    """Read and validate a config.txt."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise DescriptionError(f"{path}: cannot read the model description: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DescriptionError(f"{path}: not JSON ({exc}); see docs/convert.md for the format") from None
    return parse_description(raw, path)


def parse_description(raw: Any, source: Path | None = None) -> ModelDescription:
    where = str(source) if source else FILE_NAME

    def problem(field: str, message: str) -> DescriptionError:
        return DescriptionError(f"{where}: '{field}': {message}")

    if not isinstance(raw, dict):
        raise DescriptionError(f"{where}: expected a JSON object with {', '.join(FIELDS)}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise problem(unknown[0], f"unknown field; allowed: {', '.join(FIELDS)}")
    batch_size = raw.get("batch_size", 0)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 0:
        raise problem("batch_size", f"{batch_size!r} is not a whole number >= 0 (0: no batch axis)")
    inputs = _tensors(raw, "input", batch_size, problem)
    outputs = _tensors(raw, "output", batch_size, problem)
    names = [t.name for t in inputs + outputs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise problem("name", f"{duplicate!r} is used twice; every input and output needs its own name")
    return ModelDescription(batch_size=batch_size, inputs=inputs, outputs=outputs, source=source)


def _tensors(raw: dict, key: str, batch_size: int, problem) -> tuple[TensorDescription, ...]:
    entries = raw.get(key)
    if not isinstance(entries, list) or not entries:
        raise problem(key, 'expected a non-empty list of {"name", "data_type", "dims", "node_name"}')
    return tuple(_tensor(entry, f"{key}[{i}]", batch_size, problem) for i, entry in enumerate(entries))


def _tensor(entry: Any, where: str, batch_size: int, problem) -> TensorDescription:
    if not isinstance(entry, dict):
        raise problem(where, 'expected an object {"name", "data_type", "dims", "node_name"}')
    unknown = sorted(set(entry) - set(TENSOR_FIELDS))
    if unknown:
        raise problem(f"{where}.{unknown[0]}", f"unknown field; allowed: {', '.join(TENSOR_FIELDS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise problem(f"{where}.name", 'required: the tensor\'s name, e.g. "image"')
    data_type = entry.get("data_type")
    dtype = DTYPES.get(str(data_type).lower()) if isinstance(data_type, str) else None
    if dtype is None:
        raise problem(f"{where}.data_type", f"{data_type!r} is not a type; e.g. float32, int64, TYPE_FP32, DT_FLOAT")
    dims: Any = entry.get("dims")
    valid = isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in dims)
    if not valid or any(d == 0 or d < -1 for d in dims):
        raise problem(f"{where}.dims", f"{dims!r}: expected a list of sizes, -1 for any size, e.g. [-1, 3, 224, 224]")
    if batch_size > 0 and (not dims or dims[0] != -1):
        raise problem(
            f"{where}.dims", f"{dims}: with batch_size {batch_size} the first dim is the batch axis and must be -1"
        )
    node_name = entry.get("node_name", name)
    if not isinstance(node_name, str) or not node_name:
        raise problem(
            f"{where}.node_name",
            'expected the tensor\'s name in the source model, e.g. "image" or "serving_default_image:0"',
        )
    return TensorDescription(name=name, dtype=dtype, dims=tuple(dims), node_name=node_name)
