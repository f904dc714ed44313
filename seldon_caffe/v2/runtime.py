"""SeldonCaffeRuntime: a model directory as an MLServer model, spoken to over V2 REST and gRPC.

A request goes `predict` -> codec.py (V2 tensors -> the payload a hook sees) -> the same
Pipeline as Seldon v1 (hooks -> runtime) -> codec.py (the answer -> tensors). Nothing here
imports seldon_core: Seldon Core v2 and KServe serve it with no BSL-licensed package.

The hooks and the engine run in a thread pool of this runtime's own, off MLServer's event
loop, so one slow request never stalls the others (nor health checks). That is also why
MLServer's parallel workers are best left off for this runtime (`parallel_workers: 0`, as
`seldon-caffe serve --protocol v2` and our manifests set): the pool gives the concurrency,
one engine is loaded per process instead of one per worker, and errors reach the client with
their own message (a worker prefixes every message with an exception class path).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from mlserver.utils import get_model_uri
from prometheus_client import Gauge, Histogram

from ..errors import ModelUnavailable, SeldonCaffeError, first_line
from ..patching import PatchError
from ..pipeline import STAGES, Pipeline, RequestStats, log_failure
from ..server import LOG_FORMAT
from . import patches
from .codec import decode_request, encode_outputs

logger = logging.getLogger("seldon_caffe.v2")

DEFAULT_THREADS = 4

try:
    patches.apply()
except PatchError as error:
    # MLServer would log a model that failed to load and go on serving nothing: stop instead,
    # with the one line that says which library changed.
    print(f"seldon-caffe: error: {error}", file=sys.stderr, flush=True)
    os._exit(1)


class SeldonCaffeRuntime(MLModel):
    """Serve one model directory: `parameters.uri` (default: the folder holding
    model-settings.json). `parameters.extra` may set `runtime` (overriding model.yaml's) and
    `threads` (the pool running hooks and the engine, default 4)."""

    pipeline: Pipeline | None = None

    async def load(self) -> bool:
        _ensure_log_handler()
        extra = self._extra()
        model_dir = await self._model_dir()
        # An engine's load (OpenVINO's compile, a Caffe conversion) takes seconds: not on the loop.
        self.pipeline = await asyncio.to_thread(Pipeline.load, model_dir, extra.get("runtime"))
        threads = _threads(extra)
        if self.pipeline.batcher is not None:  # a full batch needs that many requests waiting at once
            threads = max(threads, self.pipeline.batcher.config.max_batch_size)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"seldon-caffe-{self.name}")
        self._describe(self.pipeline.metadata())
        logger.info("loaded %s from %s with runtime %s", self.name, model_dir, self.pipeline.model.name)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        stats = RequestStats()
        loop = asyncio.get_running_loop()
        try:
            response = await loop.run_in_executor(self._executor, self._answer, payload, stats)
        except SeldonCaffeError as error:
            raise MLServerError(str(error), error.status) from error
        self._observe(stats)
        return response

    def _observe(self, stats: RequestStats) -> None:
        labels = (self.name, self.version or "")
        for stage, ms in stats.stages.items():
            METRICS[f"{stage}_seconds"]().labels(*labels).observe(ms / 1000.0)
        if stats.batch_rows is not None:
            METRICS["batch_size"]().labels(*labels).observe(stats.batch_rows)
        if stats.queue_depth is not None:
            METRICS["queue_depth"]().labels(*labels).set(stats.queue_depth)

    async def unload(self) -> bool:
        if self.pipeline is not None:
            self._executor.shutdown(wait=True)
            self.pipeline.close()
            self.pipeline = None
        return True

    def _answer(self, request: InferenceRequest, stats: RequestStats) -> InferenceResponse:
        """One request, in a pool thread: decode, the pipeline, encode. Every failure is
        logged here, once, and raised as the package's own error."""
        pipeline = self.pipeline
        if pipeline is None:  # unloaded while the request waited
            raise ModelUnavailable(f"model {self.name} is not loaded")
        try:
            by_name = "preprocess" not in pipeline.hooks.user
            payload, names, meta = decode_request(request, by_name)
            result = pipeline.answer(payload, meta, names, stats, keep_outputs=True)
            outputs = pipeline.model.outputs
            single = outputs[0].name if len(outputs) == 1 else "output"
            requested = [output.name for output in request.outputs or []]
            tensors = encode_outputs(result, single, requested)
        except SeldonCaffeError as error:
            log_failure(error)
            raise
        except Exception as exc:  # ours to fix: the traceback goes to the log
            internal = SeldonCaffeError(f"internal error: {type(exc).__name__}: {first_line(exc)}")
            logger.error("request failed (500): %s", internal, exc_info=exc)
            raise internal from exc
        return InferenceResponse(model_name=self.name, model_version=self.version, id=request.id, outputs=tensors)

    def _extra(self) -> dict[str, Any]:
        parameters = self.settings.parameters
        return dict(parameters.extra or {}) if parameters else {}

    async def _model_dir(self) -> Path:
        if self.settings.parameters and self.settings.parameters.uri:
            return Path(await get_model_uri(self.settings))
        source = self.settings._source  # the model-settings.json MLServer read, when it read one
        return Path(source).parent if source else Path.cwd()

    def _describe(self, metadata: dict[str, Any]) -> None:
        """The V2 metadata from the runtime's signature, unless model-settings.json gives its own."""
        # mlserver's inputs/outputs setters are unannotated: mypy cannot type the properties.
        if not self.inputs:  # type: ignore[has-type]
            self.inputs = [MetadataTensor(**tensor) for tensor in metadata["inputs"]]
        if not self.outputs:  # type: ignore[has-type]
            self.outputs = [MetadataTensor(**tensor) for tensor in metadata["outputs"]]
        self.settings.platform = self.settings.platform or metadata["platform"]
        self.settings.versions = self.settings.versions or metadata["versions"]


def _threads(extra: dict[str, Any]) -> int:
    value = extra.get("threads", DEFAULT_THREADS)
    if isinstance(value, str) and value.isdigit():  # Seldon Core v2 passes Model parameters as strings
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SeldonCaffeError(f"model-settings parameters.extra.threads: expected a positive integer, got {value!r}")
    return value


def _metric(kind: type, name: str, description: str, **kwargs: Any) -> Callable[[], Any]:
    """A metric made on first use, on prometheus_client's default registry and not
    `mlserver.register`'s: MLServer's endpoint shows only the default one when parallel
    workers are off, and with them on, every registry's values go through the multiprocess
    files, whose mode needs metrics made lazily."""
    labels = ["model_name", "model_version"]
    return functools.cache(lambda: kind(f"seldon_caffe_{name}", description, labelnames=labels, **kwargs))


# The same names as over Seldon v1 (model.py's metrics())
METRICS = {
    **{
        f"{stage}_seconds": _metric(Histogram, f"{stage}_seconds", f"time a request spent in the {stage} stage")
        for stage in STAGES
    },
    "batch_size": _metric(
        Histogram,
        "batch_size",
        "rows in the merged run that answered a request",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    ),
    "queue_depth": _metric(Gauge, "queue_depth", "requests waiting for a batch when the last one arrived"),
}


def _ensure_log_handler() -> None:
    """Failed requests are logged by `seldon_caffe.*` loggers: give them a handler when
    nobody configured logging (MLServer configures only its own logger)."""
    ours = logging.getLogger("seldon_caffe")
    if not ours.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
