"""One model directory, loaded and answering requests: what every protocol serves.

The protocols differ only at their edges: model.py (Seldon v1) and v2/ (the V2 protocol, on
MLServer) each turn their wire format into the payload a hook sees and encode whatever
postprocess returns. Between those edges every request takes the same path, here:
preprocess -> run_model -> postprocess, with the run_model stage merged across concurrent
requests when model.yaml turns batching on (batching.py). Nothing here knows a protocol.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .batching import Batcher, check_batchable
from .config import ModelConfig, load_config
from .errors import HookError, SeldonCaffeError
from .hooks import Context, Hooks, request_context
from .runtimes import Runtime, TensorSpec, load_runtime

logger = logging.getLogger("seldon_caffe.model")

STAGES = ("preprocess", "queue", "run_model", "postprocess")  # queue: waiting for a batch

# numpy dtype -> the V2 protocol's datatype (Seldon's metadata uses the same names)
V2_DATATYPES = {
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


@dataclass
class RequestStats:
    """How one request was served, for the protocol's metrics."""

    stages: dict[str, float] = field(default_factory=dict)  # stage -> milliseconds
    batch_rows: int | None = None  # rows of the merged run that answered it (batching on)
    queue_depth: int | None = None  # requests waiting for a batch when it arrived


@dataclass
class Pipeline:
    """A loaded model directory: its config, runtime, hooks and the context setup() made."""

    config: ModelConfig
    model: Runtime
    hooks: Hooks
    context: Context
    batcher: Batcher | None = None  # model.yaml's batching, when the hooks allow it

    @classmethod
    def load(cls, model_dir: str | Path, runtime: str | None = None) -> Pipeline:
        """model.yaml -> the runtime -> the hooks -> setup(ctx). Raises ModelLoadError."""
        config = load_config(model_dir, runtime)
        model = load_runtime(config)
        try:
            hooks = Hooks(config.hooks)
            hooks_logger = logging.getLogger(f"hooks.{config.name}")
            context = Context(model_dir=config.model_dir, config=config, logger=hooks_logger)
            context.state = hooks.setup(context)
            pipeline = cls(config, model, hooks, context)
            pipeline.batcher = pipeline._batcher()
        except BaseException:
            model.close()  # a pycaffe worker or a GPU context must not outlive a failed load
            raise
        logger.debug("loaded %s with runtime %s; %s", config.name, model.name, model.signature())
        return pipeline

    def _batcher(self) -> Batcher | None:
        """A Batcher when model.yaml asks for one and run_model may see merged requests."""
        batching = self.config.batching
        if batching is None:
            return None
        check_batchable(self.model.inputs, str(self.config.source))
        user_run = self.hooks.user.get("run_model")
        if user_run is not None and not (batching.hooks_batch_safe or getattr(user_run, "batch_safe", False)):
            logger.warning(
                "batching is on, but run_model in %s is not declared batch-safe: each request runs alone "
                "(set run_model.batch_safe = True, or batching.hooks_batch_safe: true, once it takes merged batches)",
                self.hooks.path.name if self.hooks.path else "hooks.py",
            )
            return None
        return Batcher(batching, self._run_merged, self.config.name)

    def _run_merged(self, inputs: dict[str, np.ndarray], parts: list[Any]) -> Any:
        return self.hooks.run_model(self.model, inputs, replace(self.context, batch=parts))

    def answer(
        self,
        payload: Any,
        meta: dict[str, Any] | None = None,
        names: list[str] | None = None,
        stats: RequestStats | None = None,
        keep_outputs: bool = False,
    ) -> Any:
        """preprocess -> run_model -> postprocess for one request; each stage's time goes into
        `stats`. A failure is raised as the package's own error, whose `status` the protocol
        answers with; the protocol logs it (log_failure) with its own decoding errors.

        keep_outputs: without a user postprocess hook, return run_model's {name: array} as
        it is. The V2 protocol sends each array as a named tensor; the default postprocess
        shapes the answer for Seldon's single-payload messages instead.
        """
        stats = RequestStats() if stats is None else stats
        ctx = request_context(self.context, payload, meta, names)
        with _timed(stats.stages, "preprocess"):
            inputs = self.hooks.preprocess(payload, ctx)
        if self.batcher is not None:
            outputs = self._run_batched(self.batcher, inputs, ctx, stats)
        else:
            with _timed(stats.stages, "run_model"):
                outputs = self.hooks.run_model(self.model, inputs, ctx)
        if keep_outputs and "postprocess" not in self.hooks.user:
            return outputs
        with _timed(stats.stages, "postprocess"):
            return self.hooks.postprocess(outputs, ctx)

    def _run_batched(self, batcher: Batcher, inputs: Any, ctx: Context, stats: RequestStats) -> dict[str, np.ndarray]:
        """This request's share of a merged run. Its inputs are checked first, so a bad one
        is this request's 400 alone and never joins a batch."""
        feed = self.model.check_inputs(inputs)
        stats.queue_depth = batcher.depth
        served = batcher.submit(feed, ctx)
        stats.stages.update(queue=served.queue_ms, run_model=served.run_ms)
        stats.batch_rows = served.batch_rows
        return served.outputs

    def metadata(self) -> dict[str, Any]:
        return signature_metadata(self.config, self.model)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.model.close()


def log_failure(error: SeldonCaffeError) -> None:
    """A failed request, once: ours to fix (500) with its traceback and the hook's own."""
    if error.status == 500:
        logger.error("request failed (%d): %s", error.status, error, exc_info=error)
    else:
        logger.warning("request failed (%d): %s", error.status, error)


def signature_metadata(config: ModelConfig, model: Runtime) -> dict[str, Any]:
    """The signature in the V2 protocol's metadata form (Seldon v1 shows the same)."""
    return {
        "name": config.name,
        "versions": [f"{config.format}/{model.name}"],
        "platform": f"seldon-caffe/{model.name}",
        "inputs": [tensor_metadata(spec) for spec in model.inputs],
        "outputs": [tensor_metadata(spec) for spec in model.outputs],
    }


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": V2_DATATYPES.get(spec.dtype, "BYTES"), "shape": list(spec.shape)}


def jsonable(result: Any) -> Any:
    """Let hooks return numpy values inside dicts and lists: JSON encoders cannot."""
    if isinstance(result, (np.ndarray, str, bytes)):
        return result
    if isinstance(result, (dict, list, tuple)):
        try:
            return json.loads(json.dumps(result, default=_numpy_default, allow_nan=False))
        except ValueError:  # NaN or Inf somewhere inside
            raise non_finite_answer() from None
    return result


def check_finite(array: np.ndarray) -> None:
    """NaN and Inf have no JSON form: refuse to answer with them rather than send invalid
    JSON or fail in a serializer."""
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise non_finite_answer()


def non_finite_answer() -> SeldonCaffeError:
    return SeldonCaffeError(
        "the answer holds NaN or Inf, which JSON cannot carry; ask with binData for a .npy answer, "
        "or replace them in a postprocess hook"
    )


def _numpy_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise HookError(f"hook postprocess returned a {type(value).__name__}, which cannot be sent as JSON")


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = (time.perf_counter() - start) * 1000.0
