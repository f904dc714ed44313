"""The `pycaffe` runtime: real BVLC Caffe, in this process or in a worker process.

In this process when `import caffe` works here. Otherwise pycaffe lives in another
interpreter (Debian's python3-caffe in a chroot, a conda env with Python 3.6...): the
worker (`pycaffe_worker.py`) is started from `options.pycaffe_command` and spoken to over
its stdin/stdout by `pycaffe_process.WorkerProcess`, which restarts a worker that dies or
hangs (past `options.timeout_s`) so that it costs one request, not the service.

Caffe reshapes per call, so the signature is the one every Caffe runtime shows
(runtimes/caffe_model.py: free input dims are -1, each request's sizes are checked by the
shape rules before Caffe sees them, whose CHECK failure would kill the worker), and any blob
can be answered (model.yaml `outputs:`). Where our parser cannot read the net (a fork's
layer it does not know), the worker's own description stands in: Caffe's declared shapes,
the batch free.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ModelConfig
from ..errors import BadRequest, ModelLoadError, SeldonCaffeError
from . import pycaffe_worker as wire
from .base import Arrays, Runtime, TensorSpec
from .builtin import PycaffeOptions
from .pycaffe_process import WorkerProcess

if TYPE_CHECKING:  # imported where used: in-process pycaffe may run on a Python whose protobuf cannot
    from .caffe_model import CaffeModel

logger = logging.getLogger(__name__)


class PycaffeRuntime(Runtime):
    name = "pycaffe"

    def __init__(self, config: ModelConfig, caffe: CaffeModel | None = None):
        """`caffe`: serve this Caffe net (e.g. one made in memory) instead of the config's files."""
        # A net with Python layers: their modules are in the model directory, for Caffe and for
        # our shape rules (caffe/python_layer.py), which run their setup + reshape here.
        self._layer_root = _python_layer_root(config) if caffe is None else None
        self.model = caffe or _read_model(config, self._layer_root)
        if caffe is not None:
            prototxt, weights = caffe.net().prototxt_bytes(), caffe.net().caffemodel_bytes()
        else:  # the user's files, untouched: their Caffe reads them
            prototxt, weights = config.files["prototxt"].read_bytes(), config.files["weights"].read_bytes()
        # checked in either mode: a typo should not wait for a worker to show
        options = PycaffeOptions.from_config(config)
        layer_dirs = [self._layer_root] if self._layer_root is not None else []
        caffe, why = _import_caffe()
        if caffe is not None:
            self._backend: InProcess | WorkerProcess = InProcess(caffe, prototxt, weights, layer_dirs)
        elif options.pycaffe_command:
            self._backend = WorkerProcess(
                list(options.pycaffe_command),
                prototxt,
                weights,
                options.threads,
                label=config.name,
                timeout_s=options.timeout_s,
                spare=options.spare_worker,
                python_path=[seen_by(list(options.pycaffe_command), d) for d in layer_dirs],
            )
        else:
            raise ModelLoadError(
                f"{config.source}: runtime pycaffe: `import caffe` fails in this Python ({why}) and "
                'options.pycaffe_command is not set; set it to an interpreter with pycaffe, e.g. ["chroot", '
                'ROOT, "python3"] for the root `make caffe-env` builds, or use runtime: opencv'
            )
        info = self._backend.info
        if self.model is not None:
            self.inputs, self.outputs = list(self.model.inputs), list(self.model.outputs)
            self.example_shapes = dict(self.model.warm_shapes)
            if self._layer_root is not None:  # a Python layer's forward may size any blob after it
                self.outputs = [replace(spec, shape=(-1,) * len(spec.shape)) for spec in self.outputs]
        else:
            self.inputs = [_spec(item) for item in info["inputs"]]
            self.outputs = _described_outputs(info, config)
        self.layer_types: dict[str, str] = dict(info["layers"])
        self.native = self._backend.native

    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        if self.model is not None and self.model.has_free_dims:
            with _layer_scope(self._layer_root):  # the shape rules of Python layers import them
                self.model.check({name: array.shape for name, array in feed.items()})  # a CHECK failure kills Caffe
        header = {"op": "run", "inputs": list(feed), "outputs": outputs}
        results = self._backend.request(header, list(feed.values()))
        return {name: results[i] for i, name in enumerate(outputs)}

    def get_weights(self, layer: str) -> list[np.ndarray]:
        return self._backend.request({"op": "get_weights", "layer": layer})

    def set_weights(self, layer: str, arrays: Sequence[np.ndarray]) -> None:
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
        self._backend.request({"op": "set_weights", "layer": layer}, arrays)

    def close(self) -> None:
        self._backend.close()


def _read_model(config: ModelConfig, layer_root: Path | None) -> CaffeModel | None:
    """The net as our parser reads it, or None where it cannot (Caffe may: a fork's layer, a
    Python layer whose module imports only in the user's Caffe's Python), or where our Caffe
    format does not import (in-process pycaffe on Debian's Python 3.9, whose protobuf predates
    our generated caffe_pb2)."""
    try:
        from ..caffe import CaffeFormatError
        from ..caffe.tolerant import unsupported_types
        from .caffe_model import CaffeModel
    except ImportError as exc:
        logger.info("our Caffe format does not import here (%s); the signature is the one Caffe describes", exc)
        return None
    try:
        unknown = unsupported_types(config.files["prototxt"])
        if unknown:  # the user's Caffe gets the files untouched and is the judge of these
            logger.info(
                "%s: layer types %s have no shape rule here; the signature is the one Caffe describes",
                config.files["prototxt"],
                ", ".join(unknown),
            )
            return None
        with _layer_scope(layer_root):
            return CaffeModel.from_config(config)
    except CaffeFormatError as exc:
        logger.info("%s; the signature is the one Caffe describes", exc)
        return None


def _described_outputs(info: dict[str, Any], config: ModelConfig) -> list[TensorSpec]:
    """The outputs the worker describes, or the blobs model.yaml `outputs:` names."""
    if not config.outputs:
        return [_spec(item) for item in info["outputs"]]
    blobs = {item["name"]: item for item in info.get("blobs", [])}
    unknown = [entry["name"] for entry in config.outputs if entry["name"] not in blobs]
    if unknown:
        raise ModelLoadError(
            f"{config.source}: field 'outputs': the net has no blob {unknown[0]!r}; "
            f"any of its blobs can be an output: {', '.join(blobs)}"
        )
    return [_spec(blobs[entry["name"]]) for entry in config.outputs]


def _spec(item: dict[str, Any]) -> TensorSpec:
    # The batch dimension is free: the net is reshaped to each request's batch.
    shape = tuple(item["shape"])
    return TensorSpec(item["name"], "float32", (-1, *shape[1:]) if shape else shape)


def _python_layer_root(config: ModelConfig) -> Path | None:
    """The model directory, where the net has Python layers: their modules live there. Where
    our Caffe format does not import (see _read_model), Caffe itself finds them on sys.path."""
    try:
        from .segmented import has_python_layers  # here: in-process pycaffe may run on a Python whose protobuf is old
    except ImportError:
        return None
    return config.model_dir if has_python_layers(config) else None


def _layer_scope(root: Path | None) -> contextlib.AbstractContextManager[None]:
    """Where our shape rules import Python layers' modules from (caffe/python_layer.py)."""
    if root is None:
        return contextlib.nullcontext()
    from ..caffe.python_layer import model_directory

    return model_directory(root)


def seen_by(command: list[str], directory: Path) -> str:
    """`directory` as the worker's interpreter sees it: under `chroot ROOT ...`, its path
    inside ROOT. A directory outside ROOT cannot be seen there (a warning says so): place
    the model directory under ROOT for its Python layers to import."""
    root = _chroot_root(command)
    if root is None:
        return str(directory)
    try:
        return "/" + str(directory.resolve().relative_to(root.resolve()))
    except ValueError:
        logger.warning(
            "%s is outside the chroot %s: the pycaffe worker cannot import the net's Python layers from it; "
            "place the model directory under %s",
            directory,
            root,
            root,
        )
        return str(directory)


def _chroot_root(command: list[str]) -> Path | None:
    """ROOT of a `chroot [OPTION...] ROOT COMMAND` command line, else None."""
    if not command or Path(command[0]).name != "chroot":
        return None
    return next((Path(arg) for arg in command[1:] if not arg.startswith("-")), None)


@contextlib.contextmanager
def _on_sys_path(directories: Sequence[Path]) -> Iterator[None]:
    entries = [str(d) for d in directories if str(d) not in sys.path]
    sys.path[:0] = entries
    try:
        yield
    finally:
        for entry in entries:
            if entry in sys.path:
                sys.path.remove(entry)


def _import_caffe() -> tuple[Any, str]:
    try:
        return wire.import_caffe(light=False), ""
    except Exception as exc:  # ImportError, or a broken build failing as it loads
        return None, f"{type(exc).__name__}: {exc}"


class InProcess:
    """pycaffe imported here: the worker's own NetHandler, called directly under a lock.

    Unlike the worker, a Caffe CHECK failure here aborts the whole process, and OpenBLAS
    keeps the thread count it started with (options.threads cannot change it).
    """

    def __init__(self, caffe: Any, prototxt: bytes, weights: bytes, layer_dirs: Sequence[Path] = ()):
        self._handler: wire.NetHandler | None
        try:
            with _on_sys_path(layer_dirs):  # where Caffe imports Python layers' modules, while it does
                self._handler = handler = wire.NetHandler(caffe, prototxt, weights)
        except Exception as exc:  # a prototxt that does not parse, a file Caffe's reader rejects
            raise ModelLoadError(f"pycaffe cannot load the net: {type(exc).__name__}: {exc}") from None
        self._lock = threading.Lock()  # one caffe.Net: its blobs are shared state
        self.info = handler.describe()
        self.native = handler.net

    def request(self, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
        with self._lock:
            try:
                assert self._handler is not None, "the net is closed"  # close() drops it
                reply, results = self._handler.handle(header, list(arrays))
            except wire.RequestError as exc:
                raise BadRequest(f"pycaffe ({header['op']}): {exc}") from None
            except Exception as exc:  # as the worker reports it: the request fails, the net stays
                raise SeldonCaffeError(f"pycaffe ({header['op']}): {type(exc).__name__}: {exc}") from None
            return [np.array(r, copy=True) for r in results]  # blobs are overwritten by the next run

    def close(self) -> None:
        self._handler = None
