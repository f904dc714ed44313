"""The one small protocol every runtime implements: the model object a hook sees.

A runtime subclasses `Runtime` and writes `_run` (plus `get_weights` / `set_weights` where
its engine allows). `Runtime.run` is the public entry: it checks the request against the
signature first, so every runtime rejects a bad input with the same 400 message, and the
engines only ever see arrays of the right names, dtypes and ranks.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BadRequest, Unsupported

if TYPE_CHECKING:
    from ..config import ModelConfig

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, numpy dtype name and shape (-1 = any size)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        dims = ", ".join("N" if d == -1 else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


class Runtime(abc.ABC):
    """A loaded model. Subclasses set `inputs`, `outputs` and `native` in `__init__`."""

    name: str = "?"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    native: Any = None
    # Input shapes the model is known to run at (its warm-up shapes), where the signature has
    # free dims besides the batch (a fully convolutional Caffe net): for tools that need an
    # example input (runtimes/auto.py's timing). None: the signature's own dims, batch aside.
    example_shapes: dict[str, tuple[int, ...]] | None = None
    # NaN/Inf in a float input is a 400 unless model.yaml opts in (options.allow_non_finite):
    # engines propagate them silently into answers that look valid.
    allow_non_finite: bool = False
    # A runtime that moves inputs to a GPU checks them there instead (check_finite on the host
    # costs a pass over the input, as much as the copy itself; on the GPU, microseconds).
    checks_finite_on_device: bool = False

    if TYPE_CHECKING:
        # The constructor every runtime has: the registry builds it from the model's config
        # (runtimes.load_runtime). Declared for the type checker only: a subclass defines it.
        def __init__(self, config: ModelConfig) -> None: ...

    def run(self, inputs: np.ndarray | Mapping[str, Any], outputs: Sequence[str] | None = None) -> Arrays:
        """Run the model: `inputs` is one array (single-input model) or {name: array}.

        Returns {output name: array} for `outputs` (default: every output). Safe to call
        from several threads at once.
        """
        return self._run(self.check_inputs(inputs), self.check_outputs(outputs))

    @abc.abstractmethod
    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        """Run on validated inputs, returning the named outputs."""

    def get_weights(self, layer: str) -> list[np.ndarray]:
        raise Unsupported(f"the {self.name} runtime cannot read weights (layer {layer!r}); use pycaffe or opencv")

    def set_weights(self, layer: str, arrays: Sequence[np.ndarray]) -> None:
        raise Unsupported(f"the {self.name} runtime cannot change weights (layer {layer!r}); use pycaffe or opencv")

    def close(self) -> None:
        """Free the engine. The object is unusable afterwards."""
        self.native = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- validation shared by every runtime -------------------------------------------

    def signature(self) -> str:
        ins = "; ".join(s.describe() for s in self.inputs)
        return f"inputs {ins}"

    def check_inputs(self, inputs: np.ndarray | Mapping[str, Any]) -> Arrays:
        """Map the request onto the signature, or raise BadRequest saying what was expected."""
        if not isinstance(inputs, Mapping):
            if len(self.inputs) != 1:
                names = ", ".join(s.name for s in self.inputs)
                raise BadRequest(f"the model has {len(self.inputs)} inputs ({names}): send {{name: array}}")
            inputs = {self.inputs[0].name: inputs}
        specs = {s.name: s for s in self.inputs}
        unknown = [name for name in inputs if name not in specs]
        if unknown:
            raise BadRequest(f"unknown input {unknown[0]!r}; expected {self.signature()}")
        missing = [name for name in specs if name not in inputs]
        if missing:
            raise BadRequest(f"missing input {missing[0]!r}; expected {self.signature()}")
        feed = {name: _conform(specs[name], value) for name, value in inputs.items()}
        if not self.allow_non_finite and not self.checks_finite_on_device:
            for name, array in feed.items():
                check_finite(name, array)
        return feed

    def check_outputs(self, outputs: Sequence[str] | None) -> list[str]:
        known = [s.name for s in self.outputs]
        if outputs is None:
            return known
        if isinstance(outputs, str):
            outputs = [outputs]
        for name in outputs:
            if name not in known:
                raise BadRequest(f"unknown output {name!r}; the model has outputs {', '.join(known)}")
        return list(outputs)


def _conform(spec: TensorSpec, value: Any) -> np.ndarray:
    """Cast `value` to the spec's dtype when that loses nothing meaningful, check its shape."""
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise BadRequest(
            f"input {spec.name!r} is not a rectangular array ({exc}); expected {spec.describe()}"
        ) from None
    want = np.dtype(spec.dtype)
    if array.dtype != want:
        if not _castable(array.dtype, want):
            raise BadRequest(f"input {spec.name!r} has dtype {array.dtype}; expected {spec.describe()}")
        array = array.astype(want)
    if array.ndim != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape, array.shape, strict=True)):
        raise BadRequest(f"input {spec.name!r} has shape {list(array.shape)}; expected {spec.describe()}")
    return np.ascontiguousarray(array)


def _castable(have: np.dtype, want: np.dtype) -> bool:
    # JSON numbers arrive as float64 or int64: any real number fits a float input, and
    # integers fit an integer input. Strings, objects, booleans and complex numbers do not.
    if want.kind == "f":
        return have.kind in "fiu"
    if want.kind in "iu":
        return have.kind in "iu"
    return False


def check_finite(name: str, array: np.ndarray) -> None:
    """A 400 naming the input when a float array holds NaN or Inf."""
    if array.dtype.kind != "f" or np.isfinite(array).all():  # one pass over float inputs only
        return
    bad = ~np.isfinite(array)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    kinds = " and ".join(k for k, hit in (("NaN", np.isnan(array).any()), ("Inf", np.isinf(array).any())) if hit)
    raise BadRequest(
        f"input {name!r} holds {int(bad.sum())} non-finite value(s) ({kinds}), the first at index {list(first)}; "
        "send finite numbers, or set options.allow_non_finite: true in model.yaml if the model expects them"
    )
