"""SeldonCaffeModel: the Seldon user-model class, and the only module that knows Seldon.

A request goes `predict` -> the hooks (hooks.py) -> the runtime (runtimes/), through the
protocol-free Pipeline (pipeline.py) that the V2 route (v2/) shares. Errors raised on the way
are the package's own (errors.py); here they become Seldon's exception with the right HTTP
status, so the service answers 400/500/503 and keeps serving.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.json_format import ParseError
from seldon_core.flask_utils import SeldonMicroserviceException
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from .config import ModelConfig, default_model_dir, load_config
from .errors import BadRequest, ModelUnavailable, SeldonCaffeError, first_line
from .hooks import Context, Hooks
from .pipeline import Pipeline, RequestStats, check_finite, jsonable, log_failure, signature_metadata
from .runtimes import Runtime, load_runtime, resolve_runtime

logger = logging.getLogger(__name__)

METADATA_ENV = "SELDON_CAFFE_METADATA"  # init_metadata's answer, from `seldon-caffe serve`
# Seldon's REST endpoints whose request is a JSON message (check_message)
_MESSAGE_ENDPOINTS = ("Predict", "SendFeedback", "TransformInput", "TransformOutput", "Route")
# What Seldon's request decoding raises for a request it cannot read (see request_error)
_DECODING_ERRORS = (ValueError, KeyError, TypeError, RecursionError, ParseError)


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
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.runtime_override = runtime or None
        self.pipeline: Pipeline | None = None  # set once loaded: health turns ready then
        self._stats = threading.local()  # this thread's last request, for metrics()

    @property
    def model(self) -> Runtime | None:
        return self.pipeline.model if self.pipeline else None

    @property
    def hooks(self) -> Hooks | None:
        return self.pipeline.hooks if self.pipeline else None

    @property
    def context(self) -> Context | None:
        return self.pipeline.context if self.pipeline else None

    # -- lifecycle ---------------------------------------------------------------------

    def load(self) -> Pipeline:
        """Load model.yaml, the runtime and the hooks; run setup(). Raises ModelLoadError."""
        if self.pipeline is None:
            self.pipeline = Pipeline.load(self.model_dir, self.runtime_override)
        return self.pipeline

    def health_status(self) -> dict[str, Any]:
        if self.pipeline is None:
            raise SeldonError(ModelUnavailable(f"model in {self.model_dir} is not loaded yet"))
        return {"status": "ready", "model": self.pipeline.config.name, "runtime": self.pipeline.model.name}

    # -- requests ----------------------------------------------------------------------

    def predict(self, X: Any, names: list[str] | None = None, meta: dict[str, Any] | None = None) -> Any:
        """preprocess -> run_model -> postprocess, timing each stage for metrics()."""
        stats = RequestStats()
        self._stats.last = stats
        try:
            if self.pipeline is None:
                raise ModelUnavailable(f"model in {self.model_dir} is not loaded yet")
            result = jsonable(self.pipeline.answer(X, meta, names, stats))
            if isinstance(result, np.ndarray):
                check_finite(result)  # a binary (.npy) answer carries NaN; JSON cannot
        except SeldonCaffeError as error:
            log_failure(error)
            raise SeldonError(error) from error
        return result

    def request_started(self) -> None:
        """A new request on this thread: an error before predict() is one of decoding."""
        self._stats.last = None

    def request_error(self, exc: BaseException) -> SeldonMicroserviceException:
        """The status and message a request that raised `exc` gets, REST and gRPC alike.

        Seldon decodes the request before predict() and raises whatever its parsers raise
        (ValueError for a ragged array, protobuf's ParseError for a bad tftensor, RecursionError
        for JSON nested too deep): before predict() those are the client's fault, 400. An HTTP
        error (404, 405, 413, 415) keeps its status. Anything else is ours: 500, logged with
        its traceback.
        """
        if isinstance(exc, SeldonMicroserviceException):
            return exc  # predict() logged it
        if isinstance(exc, SeldonCaffeError):  # raised before predict(): check_message
            logger.warning("request failed (%d): %s", exc.status, exc)
            return SeldonError(exc)
        if isinstance(exc, HTTPException):
            exc = _wrong_method(exc)
            allowed = f" Allowed: {', '.join(exc.valid_methods or ())}." if isinstance(exc, MethodNotAllowed) else ""
            error = SeldonMicroserviceException(
                f"{exc.name}: {exc.description}{allowed}", status_code=exc.code, reason=_reason(exc.name)
            )
        elif getattr(self._stats, "last", None) is None and isinstance(exc, _DECODING_ERRORS):
            message = (
                f"the request could not be decoded ({type(exc).__name__}: {first_line(exc)}); expected a Seldon "
                'message such as {"data": {"ndarray": [[...]]}} with a rectangular array, binData, strData or jsonData'
            )
            error = SeldonMicroserviceException(message, status_code=400)
        else:
            message = f"internal error: {type(exc).__name__}: {first_line(exc)}"
            error = SeldonMicroserviceException(message, status_code=500, reason="MICROSERVICE_INTERNAL_ERROR")
            logger.error("request failed (500): %s", message, exc_info=exc)
            return error
        logger.warning("request failed (%d): %s", error.status_code, error.message)
        return error

    @property
    def model_error_handler(self) -> Any:
        """Seldon registers this Flask blueprint: it makes a request Seldon itself cannot
        decode (a ragged ndarray, a message without data) a 400 instead of Seldon's 500."""
        return _decode_error_blueprint(self)

    def metrics(self) -> list[dict[str, Any]]:
        """This thread's last request, as Seldon custom metrics: per-stage timings (TIMER),
        and with batching on, the rows of the run that answered it and the queue it found.

        Seldon takes TIMER values in milliseconds and stores them divided by 1000, so the
        histograms it exposes hold seconds: named `_seconds`, as Prometheus expects. TIMER is
        Seldon's only histogram, so the batch size goes through it too (value: rows x 1000,
        Seldon's bins reach 30).
        """
        stats: RequestStats | None = getattr(self._stats, "last", None)
        if stats is None:
            return []
        metrics = [
            {"type": "TIMER", "key": f"seldon_caffe_{stage}_seconds", "value": ms} for stage, ms in stats.stages.items()
        ]
        if stats.batch_rows is not None:
            metrics.append({"type": "TIMER", "key": "seldon_caffe_batch_size", "value": stats.batch_rows * 1000.0})
        if stats.queue_depth is not None:
            metrics.append({"type": "GAUGE", "key": "seldon_caffe_queue_depth", "value": stats.queue_depth})
        return metrics

    def tags(self) -> dict[str, Any]:
        if self.pipeline is None:
            return {}
        return {"runtime": self.pipeline.model.name, "model": self.pipeline.config.name}

    def init_metadata(self) -> dict[str, Any]:
        """The signature, in Seldon's V2 tensor metadata form (shown on /api/v1.0/metadata).

        Seldon asks once, in the parent process, before it forks the REST and gRPC workers
        that call load(). Engines are not fork-safe (TensorFlow's thread pools hang in a
        forked child, CUDA refuses), so the parent must not open the model: `seldon-caffe
        serve` hands over the metadata of its own check-load in $SELDON_CAFFE_METADATA, and
        otherwise (s2i's run) a spawned process reads it. A model that cannot load reports
        nothing here and fails in load() with its real message.
        """
        if self.pipeline is not None:
            return self.pipeline.metadata()
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
            return signature_metadata(config, probe)
    except SeldonCaffeError as error:
        logger.error("no metadata: %s", error)
        return {}


def _decode_error_blueprint(served: SeldonCaffeModel) -> Any:
    from flask import Blueprint, request
    from seldon_core.flask_utils import get_request
    from seldon_core.wrapper import PAYLOAD_PASSTHROUGH  # raw bodies: there is no message to check

    blueprint = Blueprint("seldon_caffe_errors", __name__)

    @blueprint.before_app_request
    def _new_request() -> None:
        served.request_started()
        if request.endpoint in _MESSAGE_ENDPOINTS and not PAYLOAD_PASSTHROUGH:
            check_message(get_request())  # Flask caches the parsed body: Seldon reads it again for free

    for kind in (*_DECODING_ERRORS, HTTPException):
        # app-wide, and more specific than Seldon's own handlers
        blueprint.app_errorhandler(kind)(functools.partial(rest_error_response, served))
    return blueprint


def rest_error_response(served: SeldonCaffeModel, exc: Exception) -> Any:
    """The Flask response for a request that raised `exc`: Seldon's JSON error, request_error's status."""
    from flask import jsonify

    error = served.request_error(exc)
    response = jsonify(error.to_dict())
    response.status_code = error.status_code
    return response


def check_message(message: Any) -> None:
    """A Seldon JSON message whose `meta`, `meta.tags` or `data.names` has the wrong JSON type
    is the client's mistake: a 400 saying so, before Seldon or the hooks trip over it."""
    if not isinstance(message, dict):
        return  # Seldon's own decoding says what it expected
    meta = message.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise BadRequest(f'meta must be a JSON object such as {{"tags": {{"k": 3}}}}; got {_json_type(meta)}')
    tags = (meta or {}).get("tags")
    if tags is not None and not isinstance(tags, dict):
        raise BadRequest(f'meta.tags must be a JSON object such as {{"k": 3}}; got {_json_type(tags)}')
    data = message.get("data")
    names = data.get("names") if isinstance(data, dict) else None
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise BadRequest(f"data.names must be a list of strings; got {_json_type(names)}")


def _json_type(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def describe(model_dir: str | Path, runtime: str | None = None) -> dict[str, Any]:
    """What `seldon-caffe inspect` prints: config, runtime, signature, hooks."""
    served = SeldonCaffeModel(str(model_dir), runtime)
    pipeline = served.load()
    try:
        config, hooks = pipeline.context.config, pipeline.hooks
        return {
            "name": config.name,
            "format": config.format,
            "runtime": pipeline.model.name,
            "runtime_asked": config.runtime,
            "files": {key: str(path) for key, path in config.files.items()},
            "options": config.options,
            "inputs": [spec.to_dict() for spec in pipeline.model.inputs],
            "outputs": [spec.to_dict() for spec in pipeline.model.outputs],
            "hooks_file": str(hooks.path) if hooks.path else None,
            "hooks": sorted(hooks.user),
            "auto": _auto_choice(config),
        }
    finally:
        pipeline.model.close()


def _auto_choice(config: ModelConfig) -> dict[str, Any] | None:
    """What `runtime: auto` measured for a Caffe net (runtimes/auto.py), for `inspect`."""
    if config.runtime != "auto" or config.format != "caffe":
        return None
    from .runtimes.auto import cached_choice

    choice = cached_choice(config)
    return None if choice is None else {**choice.to_dict(), "summary": choice.summary()}


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
    check_message(request)
    served = SeldonCaffeModel(str(model_dir), runtime)
    pipeline = served.load()
    try:
        return seldon_methods.predict(served, request, SeldonMetrics(worker_id_func=lambda: 0))
    except SeldonError as error:
        own = error.__cause__  # the package's own error, for the command to print...
        raise own from own.__cause__  # ...with what caused it (a hook's exception) for --traceback
    finally:
        pipeline.model.close()


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


def layer_table(model_dir: str | Path, runtime: str | None = None) -> dict[str, dict[str, Any]]:
    """Per layer type of a Caffe net: how many layers, which engines run them as Caffe does,
    why the others do not (runtimes/gaps.py, with this net's parameters: OpenCV's LRN is
    exact when k = 1). `inspect` prints it so a user sees who can serve a net."""
    config = load_config(model_dir, runtime)
    if config.format != "caffe":
        return {}
    from .caffe import read_prototxt, upgrade_net
    from .runtimes.gaps import CAFFE_ENGINES, find_gaps

    layers = list(upgrade_net(read_prototxt(config.files["prototxt"])).layer)
    kinds = [layer.type for layer in layers]
    why_not: dict[str, dict[str, str]] = {kind: {} for kind in kinds}
    for engine in CAFFE_ENGINES:
        for _, kind, reason in find_gaps(engine, layers):
            why_not[kind].setdefault(engine, reason)
    return {
        kind: {
            "count": kinds.count(kind),
            "engines": [engine for engine in CAFFE_ENGINES if engine not in not_here],
            "not": not_here,
        }
        for kind, not_here in why_not.items()
    }


def _wrong_method(exc: HTTPException) -> HTTPException:
    """Seldon's Flask app serves static files at every GET path, so GET on a POST-only route
    (/api/v1.0/predictions) comes out as 404; it is a 405 naming the method to use."""
    from flask import current_app, has_request_context, request

    if not isinstance(exc, NotFound) or not has_request_context():
        return exc
    adapter = current_app.url_map.bind_to_environ(request.environ)
    for method in ("POST", "GET"):
        try:
            endpoint, _ = adapter.match(method=method)
        except HTTPException:
            continue
        if endpoint != "static" and method != request.method:
            return MethodNotAllowed(valid_methods=[method])
    return exc


def _reason(name: str) -> str:
    return "MICROSERVICE_" + name.upper().replace(" ", "_")
