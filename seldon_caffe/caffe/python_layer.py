"""Caffe's Python layers (`type: "Python"`), run in this process the way pycaffe runs them.

A Python layer names a class in a module: `python_param { module: "rpn.proposal_layer"
layer: "ProposalLayer" param_str: "'feat_stride': 16" }`. Caffe imports the module from
sys.path, makes the object, sets `param_str` (and `phase`), calls `setup(bottom, top)` and
`reshape(bottom, top)` when it builds the net, and `reshape` then `forward` on every call.
`bottom` and `top` are lists of blobs: `.data` (a float32 numpy array whose contents the
layer reads or writes: `top[0].data[...] = x`), `.reshape(*shape)`, `.shape`, `.count` and
the legacy `.num / .channels / .height / .width`. This module keeps that contract:

* `Blob` is the blob a layer sees;
* the module is imported from the model directory first (`model_directory`), then from
  sys.path as Caffe would. The model directory is on sys.path only while the module imports,
  so its absolute imports of its own helpers (`from rpn.generate_anchors import ...`) work,
  and its modules are taken out of sys.modules afterwards (another model's `rpn` package is
  its own; the objects stay alive through the layer class). Imports done later, inside
  `forward`, do not see the model directory: import at the top of the module;
* `import caffe` inside the module resolves to real pycaffe where this Python has it, else to
  a stand-in module holding only `Layer` (the base class to subclass), `TRAIN` and `TEST`,
  present in sys.modules only while the module imports;
* the layer's top shapes come from `setup` + `reshape` at the bottoms' shapes, as Caffe finds
  them at net init: `top_shapes` is the shape rule (caffe/forks/rcnn.py registers it), run
  against the model directory of the `model_directory` scope (CaffeNet opens one on the
  prototxt's directory); `PythonLayer` is the layer set up once, for serving, whose `run`
  calls `reshape` + `forward` per call, one call at a time (Caffe's nets are single-threaded).

A Python layer's own learned blobs (`self.blobs`) are not supported: deploy-time layers such
as proposal layers have none.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import sys
import threading
import traceback
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SeldonCaffeError
from . import caffe_pb2
from ._geometry import LayerError, Shape

TRAIN, TEST = 0, 1  # caffe.TRAIN, caffe.TEST (a served net is in TEST)
CONTRACT = (
    "Caffe expects python_param.layer to name a class of that module that subclasses caffe.Layer and "
    "defines setup(self, bottom, top), reshape(self, bottom, top) and forward(self, bottom, top)"
)


class PythonLayerError(SeldonCaffeError):
    """A Python layer's code raised while serving a request: HTTP 500 naming the layer."""

    status = 500
    reason = "PYTHON_LAYER_ERROR"


# -- what the layer sees ----------------------------------------------------------------------


class Blob:
    """A Caffe blob as pycaffe shows it to a Python layer (data only: no backward here)."""

    def __init__(self, data: np.ndarray | None = None) -> None:
        self._data = data  # None until the layer reshapes a top

    @property
    def data(self) -> np.ndarray:
        """The values, a float32 array: write them in place (`top[0].data[...] = x`)."""
        if self._data is None:
            raise ValueError("this top blob has no shape yet: call top[i].reshape(...) in reshape()")
        return self._data

    @property
    def diff(self) -> np.ndarray:
        """Gradients: always zeros here (a served net runs forward only)."""
        return np.zeros_like(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def count(self) -> int:
        return int(self.data.size)

    @property
    def num(self) -> int:
        return self._legacy(0)

    @property
    def channels(self) -> int:
        return self._legacy(1)

    @property
    def height(self) -> int:
        return self._legacy(2)

    @property
    def width(self) -> int:
        return self._legacy(3)

    def _legacy(self, axis: int) -> int:
        """Caffe's LegacyShape: axes the blob lacks count as 1; more than 4 axes is an error."""
        shape = self.shape
        if len(shape) > 4:
            raise ValueError(f"num/channels/height/width need a blob of at most 4 axes, this one is {list(shape)}")
        return shape[axis] if axis < len(shape) else 1

    def reshape(self, *shape: int) -> None:
        """Give the blob a shape; its values are kept when the shape does not change."""
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise ValueError(f"blob dimensions must be >= 0, got {list(dims)}")
        if self._data is None or self._data.shape != dims:
            self._data = np.zeros(dims, np.float32)

    def _feed(self, array: np.ndarray) -> None:
        self._data = np.array(array, dtype=np.float32, copy=True)  # the layer may write into it


class Layer:
    """The stand-in for pycaffe's `caffe.Layer`: the base class a Python layer subclasses."""

    type = "Python"

    def __init__(self, param: caffe_pb2.LayerParameter | None = None) -> None:
        self.param_str = param.python_param.param_str if param is not None else ""
        self.phase = TEST
        self.blobs: list[Blob] = []

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        """Caffe's default: nothing to set up."""

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        """Caffe's default: the tops keep their shapes."""

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        raise NotImplementedError("a Python layer must define forward(self, bottom, top)")

    def backward(self, top: list[Blob], propagate_down: list[bool], bottom: list[Blob]) -> None:
        """Never called: a served net runs forward only."""


def _stand_in() -> types.ModuleType:
    module = types.ModuleType("caffe", "seldon-caffe's stand-in for pycaffe, seen by Python layers while they import")
    module.Layer, module.Blob, module.TRAIN, module.TEST = Layer, Blob, TRAIN, TEST  # type: ignore[attr-defined]
    module.__seldon_caffe_stand_in__ = True  # type: ignore[attr-defined]
    return module


STAND_IN = _stand_in()


@functools.cache
def _real_caffe() -> types.ModuleType | None:
    """pycaffe, where this Python has it (a broken build counts as none)."""
    try:
        if importlib.util.find_spec("caffe") is None:
            return None
        return importlib.import_module("caffe")
    except Exception:
        return None


# -- finding the class --------------------------------------------------------------------------

_root: contextvars.ContextVar[Path | None] = contextvars.ContextVar("python_layer_root", default=None)
_IMPORT_LOCK = threading.RLock()  # sys.path and sys.modules are the process's
_MODULES: dict[tuple[str, str, int], types.ModuleType] = {}


@contextlib.contextmanager
def model_directory(root: str | os.PathLike[str] | None, *, keep_outer: bool = False) -> Iterator[None]:
    """Python layers built inside this scope import their modules from `root` (then sys.path).
    `keep_outer`: an enclosing scope wins (CaffeNet's default, the prototxt's directory, gives
    way to the model directory a runtime names)."""
    if root is None or (keep_outer and _root.get() is not None):
        yield
        return
    token = _root.set(Path(root).resolve())
    try:
        yield
    finally:
        _root.reset(token)


def layer_class(param: caffe_pb2.LayerParameter, root: Path | None) -> type:
    """The class python_param names, imported from `root` or sys.path; LayerError if not."""
    module_name, class_name = param.python_param.module, param.python_param.layer
    if not module_name or not class_name:
        got = f"module {module_name!r}, layer {class_name!r}"
        raise LayerError(f"python_param needs module and layer (got {got}); {CONTRACT}")
    module = _import(module_name, root)
    cls = getattr(module, class_name, None)
    where = f"module {module_name!r} ({getattr(module, '__file__', None) or 'built in'})"
    if not isinstance(cls, type):
        defined = sorted(n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__)
        classes = ", ".join(defined) or "none"
        raise LayerError(f"{where} has no class {class_name!r} (its classes: {classes}); {CONTRACT}")
    bases = tuple(b for b in (Layer, getattr(_real_caffe(), "Layer", None)) if isinstance(b, type))
    if not issubclass(cls, bases):
        raise LayerError(f"class {class_name!r} of {where} does not subclass caffe.Layer; {CONTRACT}")
    if getattr(cls, "forward", Layer.forward) is Layer.forward:
        raise LayerError(f"class {class_name!r} of {where} defines no forward(self, bottom, top); {CONTRACT}")
    return cls


def _import(module: str, root: Path | None) -> types.ModuleType:
    file = _module_file(root, module) if root is not None else None
    with _IMPORT_LOCK:
        try:
            if file is not None and root is not None:
                key = (str(root), module, file.stat().st_mtime_ns)
                if key not in _MODULES:
                    _MODULES[key] = _import_scoped(root, module)
                return _MODULES[key]
            with _caffe_while_importing():
                return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module == exc.name or module.startswith(f"{exc.name}.")):
                raise LayerError(_not_found(module, root)) from None
            raise LayerError(_import_failed(module, file, exc)) from None
        except Exception as exc:  # the module's own code failed as it ran
            raise LayerError(_import_failed(module, file, exc)) from None


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def _import_scoped(root: Path, module: str) -> types.ModuleType:
    """Import `module` with `root` first on sys.path, then take the modules that came from
    `root` out of sys.modules again (and put back any of the same names they hid)."""
    names = _top_level_names(root)
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k.partition(".")[0] in names}
    entry = str(root)
    sys.path.insert(0, entry)
    importlib.invalidate_caches()  # the files may be newer than the finders' directory listings
    try:
        with _caffe_while_importing():
            return importlib.import_module(module)
    finally:
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path_importer_cache.pop(entry, None)
        for name in [k for k in sys.modules if k.partition(".")[0] in names]:
            del sys.modules[name]
        sys.modules.update(hidden)


def _top_level_names(root: Path) -> set[str]:
    """The names `root` provides: its modules and its directories of Python files (a folder
    of data, a cache, is no package and hides nothing)."""
    names = set()
    for entry in root.iterdir():
        stem = entry.name.partition(".")[0]
        if not stem.isidentifier():
            continue
        if entry.suffix in (".py", ".so", ".pyd") or (entry.is_dir() and any(entry.glob("*.py"))):
            names.add(stem)
    return names


@contextlib.contextmanager
def _caffe_while_importing() -> Iterator[None]:
    """`import caffe` gives the stand-in, unless real pycaffe is importable here."""
    if "caffe" in sys.modules or _real_caffe() is not None:
        yield
        return
    sys.modules["caffe"] = STAND_IN
    try:
        yield
    finally:
        if sys.modules.get("caffe") is STAND_IN:
            del sys.modules["caffe"]


def _not_found(module: str, root: Path | None) -> str:
    relative = "/".join(module.split("."))
    place = f"in the model directory {root} ({relative}.py or {relative}/__init__.py) or " if root else ""
    return (
        f"cannot find module {module!r} {place}on sys.path; Caffe imports python_param.module from sys.path, "
        f"seldon-caffe from the model directory: put {relative}.py there (each package directory on the way may "
        f"hold an __init__.py); {CONTRACT}"
    )


def _import_failed(module: str, file: Path | None, exc: BaseException) -> str:
    why = f"{type(exc).__name__}: {exc}{_user_frame(exc)}"
    hint = ""
    if isinstance(exc, ImportError) and (exc.name or "").startswith("caffe"):
        hint = (
            "; without pycaffe in this Python, `import caffe` gives a stand-in that has only Layer, TRAIN and TEST "
            "(serve with runtime: pycaffe for code that needs more of pycaffe)"
        )
    return f"importing module {module!r} ({file or 'from sys.path'}) failed: {why}{hint}"


def _user_frame(exc: BaseException) -> str:
    """' (at FILE:LINE)': where in the user's code `exc` was raised (its innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    here = os.path.dirname(__file__)
    mine = [f for f in frames if not f.filename.startswith(here) and "importlib" not in f.filename]
    return f" (at {mine[-1].filename}:{mine[-1].lineno})" if mine else ""


# -- running it ---------------------------------------------------------------------------------


class PythonLayer:
    """One Python layer, made and set up at the bottoms' shapes as Caffe does at net init.

    `top_shapes` are the shapes its `setup` + `reshape` gave; `run(arrays)` feeds the bottoms
    and returns copies of the tops after `reshape` + `forward`, serialising calls."""

    def __init__(self, param: caffe_pb2.LayerParameter, bottom_shapes: Sequence[Shape], root: Path | None) -> None:
        self.param = param
        cls = layer_class(param, root)
        self.label = f"Python layer {param.name!r} ({param.python_param.module}.{cls.__name__})"
        self.layer = _instantiate(cls, param)
        self.bottom = [Blob(np.zeros(shape, np.float32)) for shape in bottom_shapes]
        self.top = [self._top_blob(i) for i in range(len(param.top))]
        self._lock = threading.Lock()
        for method in ("setup", "reshape"):
            self._call(method, LayerError)
        unshaped = [i for i, blob in enumerate(self.top) if blob._data is None]
        if unshaped:
            raise LayerError(
                f"its setup() and reshape() gave top[{unshaped[0]}] ({param.top[unshaped[0]]!r}) no shape; "
                "Caffe's contract: call top[i].reshape(*shape) in reshape() (or setup())"
            )
        self.top_shapes: list[Shape] = [blob.shape for blob in self.top]

    def _top_blob(self, index: int) -> Blob:
        """A new blob, or the bottom's own where the layer works in place (top = bottom)."""
        name = self.param.top[index]
        bottoms = list(self.param.bottom)
        return self.bottom[bottoms.index(name)] if name in bottoms else Blob()

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The tops for these bottoms (reshape, then forward); a PythonLayerError if the code raises."""
        with self._lock:
            for blob, array in zip(self.bottom, arrays, strict=True):
                blob._feed(array)
            self._call("reshape", PythonLayerError)
            self._call("forward", PythonLayerError)
            return [np.array(blob.data, dtype=np.float32, copy=True) for blob in self.top]

    def _call(self, method: str, error: type[Exception]) -> None:
        try:
            getattr(self.layer, method)(self.bottom, self.top)
        except Exception as exc:
            # infer_shapes names the layer of a LayerError; a request's error names it here
            prefix = "" if error is LayerError else f"{self.label}: "
            raise error(f"{prefix}{method}() raised {type(exc).__name__}: {exc}{_user_frame(exc)}") from None


def _instantiate(cls: type, param: caffe_pb2.LayerParameter) -> Any:
    """The layer object with the attributes pycaffe sets: `param_str` (and py-faster-rcnn's
    fork's `param_str_`) and `phase`. A subclass of real pycaffe's Layer is made without
    its C++ constructor, which wants Caffe's own LayerParameter."""
    try:
        layer: Any = cls(param) if issubclass(cls, Layer) else cls.__new__(cls)
    except Exception as exc:
        raise LayerError(f"making {cls.__name__}(param) raised {type(exc).__name__}: {exc}{_user_frame(exc)}") from None
    layer.param_str = layer.param_str_ = param.python_param.param_str
    layer.phase = TEST
    return layer


def top_shapes(param: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    """The shape rule of a Python layer: what its setup + reshape give at these bottoms,
    with the module from the current `model_directory` scope (else sys.path)."""
    return PythonLayer(param, bottoms, _root.get()).top_shapes


def python_layers(net: caffe_pb2.NetParameter) -> list[str]:
    """The names of the net's Python layers, in order."""
    return [layer.name for layer in net.layer if layer.type == "Python"]
