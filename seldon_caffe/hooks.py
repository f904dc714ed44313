"""The user's hooks.py: load it, fill in the default hooks, call them.

A request flows preprocess -> run_model -> postprocess. Every hook is optional; a missing
one falls back to the default below. Hooks take `ctx` as their last argument; hooks written
for 58.com's dl_inference, `preprocess(x, **kwargs)`, are recognised by their `**kwargs`
and called with ctx's fields as keyword arguments instead, so they run unchanged.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import logging
import math
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from .config import ModelConfig
from .errors import BadRequest, HookError, ModelLoadError, SeldonCaffeError
from .limits import check_decoded_bytes

HOOK_NAMES = ("setup", "preprocess", "run_model", "postprocess")


@dataclass
class Context:
    """What a hook knows besides its data. One per request; `state` is shared by all."""

    model_dir: Path
    config: ModelConfig
    state: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    payload_type: str = ""  # the payload's Python type as Seldon delivered it: ndarray, bytes, str, dict...
    batch: list[Any] | None = None  # in a batch-safe run_model with batching on: the requests merged (BatchPart)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("seldon_caffe.hooks"))

    @property
    def tags(self) -> dict[str, Any]:
        """The request's meta.tags: where request-level parameters travel."""
        return self.meta.get("tags") or {}

    def as_kwargs(self) -> dict[str, Any]:
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        kwargs["tags"] = self.tags
        return kwargs


# -- the default hooks ----------------------------------------------------------------


def default_preprocess(payload: Any, ctx: Context) -> Any:
    """ndarray -> the single input; binData .npy/.npz -> arrays; jsonData {name: list} -> arrays."""
    if isinstance(payload, np.ndarray):
        return payload
    if isinstance(payload, bytes):
        return decode_numpy(payload)
    if isinstance(payload, dict):
        return {name: _as_array(value, f"jsonData {name!r}") for name, value in payload.items()}
    if isinstance(payload, list):
        return _as_array(payload, "the ndarray")
    kind = "strData" if isinstance(payload, str) else type(payload).__name__
    raise BadRequest(
        f"got {kind}; without a preprocess hook the model takes an ndarray/tensor, "
        "binData holding a .npy or .npz file, or jsonData {input name: array}"
    )


def default_run_model(model: Any, inputs: Any, ctx: Context) -> dict[str, np.ndarray]:
    return model.run(inputs)


def default_postprocess(outputs: Any, ctx: Context) -> Any:
    """One output -> that array; several -> jsonData {name: nested list}.

    A binary request gets a binary answer (.npy, or .npz for several outputs): a client that
    chose binData for speed should not pay for JSON on the way back.
    """
    if ctx.payload_type == "bytes" and isinstance(outputs, dict):
        return encode_numpy(outputs)
    if isinstance(outputs, dict) and len(outputs) == 1:
        return next(iter(outputs.values()))
    if isinstance(outputs, dict):
        return {name: np.asarray(value).tolist() for name, value in outputs.items()}
    return outputs


DEFAULTS: dict[str, Callable[..., Any]] = {
    "setup": lambda ctx: None,
    "preprocess": default_preprocess,
    "run_model": default_run_model,
    "postprocess": default_postprocess,
}


def decode_numpy(data: bytes) -> np.ndarray | dict[str, np.ndarray]:
    """A .npy file -> its array; a .npz file -> {name: array}. Never unpickles.

    Every array's header is read before its data: object dtypes, and arrays declaring more
    bytes in all than the request size limit (`limits.max_request_bytes()`), are a 400
    before anything is allocated, since an .npz of zeros compresses about 1000:1.
    """
    try:
        if data[:4] == b"PK\x03\x04":
            _check_npz(data)
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        shape, dtype = _npy_header(io.BytesIO(data), "binData .npy")
        check_decoded_bytes(_nbytes(shape, dtype), f"binData .npy ({_describe(shape, dtype)})")
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error, zipfile.BadZipFile) as exc:
        # RuntimeError / NotImplementedError: an encrypted or oddly compressed .npz member
        raise BadRequest(
            f"binData is not a .npy or .npz file ({exc}); send arrays saved with numpy.save/savez, "
            "or add a preprocess hook for other bytes (images, text)"
        ) from None


def _check_npz(data: bytes) -> None:
    """Every member of the .npz must be a .npy array; their declared sizes together must fit."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        described, total = [], 0
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise BadRequest(f"binData .npz holds {info.filename!r}, which is not a .npy array")
            with archive.open(info) as member:  # decompresses only as far as the header
                shape, dtype = _npy_header(member, f"binData .npz array {info.filename[:-4]!r}")
            total += _nbytes(shape, dtype)
            described.append(f"{info.filename[:-4]}: {_describe(shape, dtype)}")
    listed = ", ".join(described[:3]) + (f" and {len(described) - 3} more" if len(described) > 3 else "")
    check_decoded_bytes(total, f"binData .npz ({listed})")


def _npy_header(stream: Any, what: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a .npy header declares; the stream is left just after it."""
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = npy_format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = npy_format.read_array_header_2_0(stream)
    else:  # 3.0 exists only for structured dtypes with non-latin-1 field names: no model input
        raise BadRequest(f"{what}: .npy format version {version[0]}.{version[1]} is not accepted (1.0 and 2.0 are)")
    if dtype.hasobject:
        raise BadRequest(f"{what} holds Python objects (dtype {dtype}), which are never unpickled; send numeric arrays")
    if any(d < 0 for d in shape):
        raise BadRequest(f"{what} declares a negative dimension: shape {shape}")
    return shape, dtype


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize  # Python ints: a hostile shape cannot overflow


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
    return f"{dtype}[{', '.join(map(str, shape))}]"


def _as_array(value: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise BadRequest(f"{what} is not a rectangular array ({exc})") from None


def encode_numpy(arrays: dict[str, np.ndarray]) -> bytes:
    """{name: array} -> a .npy file for one array, a .npz file for several."""
    buffer = io.BytesIO()
    if len(arrays) == 1:
        np.save(buffer, next(iter(arrays.values())), allow_pickle=False)
    else:
        np.savez(buffer, **arrays)
    return buffer.getvalue()


# -- loading and calling --------------------------------------------------------------


class Hooks:
    """The four hooks of a model directory, each the user's or the default."""

    def __init__(self, path: Path | None):
        self.path = path
        module = _import_file(path) if path else None
        self.user = {name: getattr(module, name) for name in HOOK_NAMES if callable(getattr(module, name, None))}
        self.functions = {name: self.user.get(name, DEFAULTS[name]) for name in HOOK_NAMES}

    def setup(self, ctx: Context) -> Any:
        return self._call("setup", (), ctx)

    def preprocess(self, payload: Any, ctx: Context) -> Any:
        return self._call("preprocess", (payload,), ctx)

    def run_model(self, model: Any, inputs: Any, ctx: Context) -> Any:
        return self._call("run_model", (model, inputs), ctx)

    def postprocess(self, outputs: Any, ctx: Context) -> Any:
        return self._call("postprocess", (outputs,), ctx)

    def _call(self, name: str, args: tuple, ctx: Context) -> Any:
        function = self.functions[name]
        try:
            if _takes_kwargs_only(function, len(args)):
                return function(*args, **ctx.as_kwargs())
            return function(*args, ctx)
        except SeldonCaffeError:
            raise  # already says what is wrong (a BadRequest from model.run or the hook itself)
        except Exception as exc:
            where = f"hook {name} in {self.path.name}" if name in self.user and self.path else f"default {name}"
            raise HookError(f"{where} raised {type(exc).__name__}: {exc}") from exc


def request_context(base: Context, payload: Any, meta: dict[str, Any] | None, names: list[str] | None) -> Context:
    return replace(base, meta=dict(meta or {}), names=list(names or []), payload_type=type(payload).__name__)


def _takes_kwargs_only(function: Callable[..., Any], n_positional: int) -> bool:
    """True for dl_inference-style hooks: `f(x, **kwargs)` with no slot for ctx."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_var_pos = any(p.kind is p.VAR_POSITIONAL for p in params)
    return has_var_kw and not has_var_pos and len(positional) <= n_positional


def _import_file(path: Path) -> Any:
    """Import hooks.py under a name of its own, so two model directories never collide."""
    module_name = f"seldon_caffe_user_hooks_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"{path}: cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # hooks may import helper modules kept beside them
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ModelLoadError(f"{path}: importing the hooks failed: {type(exc).__name__}: {exc}") from exc
    return module
