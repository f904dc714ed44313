"""SeldonCaffeModel: the Seldon user-model class, and the only module that knows Seldon.

A request goes `predict` -> the hooks (hooks.py) -> the runtime (runtimes/). Errors raised
on the way are the package's own (errors.py); here they become Seldon's exception with the
right HTTP status, so the service answers 400/500/503 and keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from seldon_core.flask_utils import SeldonMicroserviceException

from .config import load_config
from .errors import HookError, ModelUnavailable, SeldonCaffeError
from .hooks import Context, Hooks, request_context
from .runtimes import Runtime, load_runtime, resolve_runtime

logger = logging.getLogger(__name__)

MODEL_DIR_ENV = "SELDON_CAFFE_MODEL_DIR"
METADATA_ENV = "SELDON_CAFFE_METADATA"  # init_metadata's answer, from `seldon-caffe serve`
DEFAULT_MODEL_DIR = "/mnt/models"  # where Seldon's storage initializer puts modelUri
STAGES = ("preprocess", "run_model", "postprocess")

# numpy dtype -> the V2 metadata datatype Seldon's metadata schema knows
_V2_DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}


class SeldonError(SeldonMicroserviceException):
    """Seldon's exception, with the message also in `args`.

    Seldon's own class leaves `str(exc)` empty; over gRPC that string is all the client
    sees, so setting it is what makes a gRPC error carry the same message as REST's 400.
    """

    def __init__(self, error: SeldonCaffeError):
        super().__init__(str(error), status_code=error.status, reason=error.reason)
        self.args = (str(error),)


class SeldonCaffeModel:
    """Serve one model directory. Seldon constructs it with the `model_dir` parameter."""

    def __init__(self, model_dir: str | None = None, runtime: str | None = None):
        self.model_dir = Path(model_dir or os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR)
        self.runtime_override = runtime or None
        self.model: Runtime | None = None
        self.hooks: Hooks | None = None
        self.context: Context | None = None
        self._timings = threading.local()

    # -- lifecycle ---------------------------------------------------------------------

    def load(self) -> None:
        """Load model.yaml, the runtime and the hooks; run setup(). Raises ModelLoadError."""
        if self.model is not None:
            return
        config = load_config(self.model_dir, self.runtime_override)
        model = load_runtime(config)
        hooks = Hooks(config.hooks)
        context = Context(model_dir=config.model_dir, config=config, logger=logging.getLogger(f"hooks.{config.name}"))
        context.state = hooks.setup(context)
        self.hooks, self.context = hooks, context
        self.model = model  # last: health turns ready only once everything above worked
        logger.info("loaded %s with runtime %s; %s", config.name, model.name, model.signature())

    def health_status(self) -> dict[str, Any]:
        if self.model is None:
            raise SeldonError(ModelUnavailable(f"model in {self.model_dir} is not loaded yet"))
        return {"status": "ready", "model": self.context.config.name, "runtime": self.model.name}

    # -- requests ----------------------------------------------------------------------

    def predict(self, X: Any, names: list[str] | None = None, meta: dict[str, Any] | None = None) -> Any:
        """preprocess -> run_model -> postprocess, timing each stage for metrics()."""
        timings: dict[str, float] = {}
        self._timings.last = timings
        try:
            if self.model is None:
                raise ModelUnavailable(f"model in {self.model_dir} is not loaded yet")
            ctx = request_context(self.context, X, meta, names)
            with _timed(timings, "preprocess"):
                inputs = self.hooks.preprocess(X, ctx)
            with _timed(timings, "run_model"):
                outputs = self.hooks.run_model(self.model, inputs, ctx)
            with _timed(timings, "postprocess"):
                result = _jsonable(self.hooks.postprocess(outputs, ctx))
        except SeldonCaffeError as error:
            logger.warning("request failed (%d): %s", error.status, error)
            raise SeldonError(error) from error
        return result

    @property
    def model_error_handler(self) -> Any:
        """Seldon registers this Flask blueprint: it makes a request Seldon itself cannot
        decode (a ragged ndarray, a message without data) a 400 instead of Seldon's 500."""
        return _decode_error_blueprint(self)

    def metrics(self) -> list[dict[str, Any]]:
        """Per-stage timings of this thread's last request, as Seldon TIMER metrics (ms)."""
        timings = getattr(self._timings, "last", None) or {}
        return [{"type": "TIMER", "key": f"seldon_caffe_{stage}_ms", "value": ms} for stage, ms in timings.items()]

    def tags(self) -> dict[str, Any]:
        if self.model is None:
            return {}
        return {"runtime": self.model.name, "model": self.context.config.name}

    def init_metadata(self) -> dict[str, Any]:
        """The signature, in Seldon's V2 tensor metadata form (shown on /api/v1.0/metadata).

        Seldon asks once, in the parent process, before it forks the REST and gRPC workers
        that call load(). Engines are not fork-safe (TensorFlow's thread pools hang in a
        forked child, CUDA refuses), so the parent must not open the model: `seldon-caffe
        serve` hands over the metadata of its own check-load in $SELDON_CAFFE_METADATA, and
        otherwise (s2i's run) a spawned process reads it. A model that cannot load reports
        nothing here and fails in load() with its real message.
        """
        if self.model is not None:
            return _metadata(self.context.config, self.model)
        handed_over = os.environ.get(METADATA_ENV)
        if handed_over:
            return json.loads(handed_over)
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(probe_metadata, (str(self.model_dir), self.runtime_override))


def probe_metadata(model_dir: str, runtime: str | None = None) -> dict[str, Any]:
    """Open the model just to read its signature (hooks' setup() is not run)."""
    try:
        config = load_config(model_dir, runtime)
        with load_runtime(config) as probe:
            return _metadata(config, probe)
    except SeldonCaffeError as error:
        logger.error("no metadata: %s", error)
        return {}


def _decode_error_blueprint(served: SeldonCaffeModel) -> Any:
    from flask import Blueprint, jsonify

    blueprint = Blueprint("seldon_caffe_errors", __name__)

    @blueprint.before_app_request
    def _new_request() -> None:
        served._timings.last = None  # predict() sets it: an error before then is in decoding

    @blueprint.app_errorhandler(ValueError)
    @blueprint.app_errorhandler(KeyError)
    @blueprint.app_errorhandler(TypeError)
    def _undecodable(exc: Exception) -> Any:
        reached_model = getattr(served._timings, "last", None) is not None
        if reached_model:  # not a decoding problem: answer as Seldon's generic handler would
            error = SeldonMicroserviceException(str(exc), status_code=500, reason="MICROSERVICE_INTERNAL_ERROR")
        else:
            message = (
                f"the request could not be decoded ({type(exc).__name__}: {exc}); expected a Seldon message "
                'such as {"data": {"ndarray": [[...]]}} with a rectangular array, binData, strData or jsonData'
            )
            error = SeldonMicroserviceException(message, status_code=400)
        logger.warning("request failed (%d): %s", error.status_code, error.message)
        response = jsonify(error.to_dict())
        response.status_code = error.status_code
        return response

    return blueprint


def _metadata(config: Any, model: Runtime) -> dict[str, Any]:
    return {
        "name": config.name,
        "versions": [f"{config.format}/{model.name}"],
        "platform": f"seldon-caffe/{model.name}",
        "inputs": [_tensor_metadata(spec) for spec in model.inputs],
        "outputs": [_tensor_metadata(spec) for spec in model.outputs],
    }


def describe(model_dir: str | Path, runtime: str | None = None) -> dict[str, Any]:
    """What `seldon-caffe inspect` prints: config, runtime, signature, hooks."""
    served = SeldonCaffeModel(str(model_dir), runtime)
    served.load()
    try:
        config, hooks = served.context.config, served.hooks
        return {
            "name": config.name,
            "format": config.format,
            "runtime": served.model.name,
            "runtime_asked": config.runtime,
            "files": {key: str(path) for key, path in config.files.items()},
            "options": config.options,
            "inputs": [spec.to_dict() for spec in served.model.inputs],
            "outputs": [spec.to_dict() for spec in served.model.outputs],
            "hooks_file": str(hooks.path) if hooks.path else None,
            "hooks": sorted(hooks.user),
        }
    finally:
        served.model.close()


def predict_once(model_dir: str | Path, request: dict[str, Any] | bytes, runtime: str | None = None) -> dict[str, Any]:
    """One request through Seldon's own decoding and encoding, without a server.

    `request` is a Seldon JSON message ({"data": {"ndarray": ...}}, {"binData": ...}, ...);
    raw bytes are sent as binData. The answer is exactly what the REST endpoint would return.
    """
    from seldon_core import seldon_methods
    from seldon_core.metrics import SeldonMetrics

    if isinstance(request, bytes):
        import base64

        request = {"binData": base64.b64encode(request).decode()}
    served = SeldonCaffeModel(str(model_dir), runtime)
    served.load()
    try:
        return seldon_methods.predict(served, request, SeldonMetrics(worker_id_func=lambda: 0))
    except SeldonError as error:
        raise error.__cause__ from None  # the package's own error, for the command to print
    finally:
        served.model.close()


def warnings_for(model_dir: str | Path, runtime: str | None = None) -> list[str]:
    """Layers the chosen runtime cannot serve like real Caffe (runtimes/gaps.py), read from
    the prototxt alone, so `inspect` can warn even when the model would fail to load."""
    config = load_config(model_dir, runtime)
    if config.format != "caffe":
        return []
    from .caffe import read_prototxt, upgrade_net
    from .runtimes.gaps import find_gaps

    layers = upgrade_net(read_prototxt(config.files["prototxt"])).layer
    name = resolve_runtime(config)
    return [f"{name} runtime, layer {layer} ({kind}): {reason}" for layer, kind, reason in find_gaps(name, layers)]


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = (time.perf_counter() - start) * 1000.0


def _tensor_metadata(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "datatype": _V2_DATATYPES.get(spec.dtype, "BYTES"), "shape": list(spec.shape)}


def _jsonable(result: Any) -> Any:
    """Let hooks return numpy values inside dicts and lists: Seldon's JSON encoder cannot."""
    if isinstance(result, (np.ndarray, str, bytes)):
        return result
    if isinstance(result, (dict, list, tuple)):
        return json.loads(json.dumps(result, default=_numpy_default))
    return result


def _numpy_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise HookError(f"hook postprocess returned a {type(value).__name__}, which cannot be sent as JSON")
