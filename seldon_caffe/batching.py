"""Adaptive batching across requests, with the hooks still per request.

An engine runs a batch of 16 images in far less than 16 times one image's time (on a GPU,
20x less; on these CPUs, 1.2-1.5x). So when requests arrive together, their inputs are run
as one batch. As in Triton's dynamic batcher:

- `preprocess` runs per request, in the request's own thread; its arrays wait in a queue keyed
  by (input names, dtypes, every dimension but the first). Only requests with the same key
  are merged: they are the ones that concatenate along the first dimension.
- A batch goes when it holds max_batch_size rows (rows, not requests: a request may carry
  several), when its oldest request has waited max_queue_delay_ms, or at once when the model
  is idle and the delay is 0. A preferred_batch_size that the queue reaches goes at once too.
- `run_model` runs once on the concatenated inputs; each output is split back by row offsets
  and `postprocess` runs per request, with its own ctx.
- A merged run that fails is re-run one request at a time, so only the culprit gets the error.
- A full queue is a 503; a request that waited past timeout_ms is a 504 before it runs, as
  soon as its time is up (a run in progress, however long, does not hold the answer back).

The model runs one batch at a time. A runner thread per model takes the batches in turn:
while it runs one, the next requests gather, which is what makes the batches grow with the
load (and stay at one request when there is none). With max_queue_delay_ms 0, a request that
finds the model idle and nobody waiting runs at once in its own thread instead, as it would
without batching: handing it to the runner costs two thread switches, and each may wait for
the GIL up to Python's 5 ms switch interval while another thread runs Python code.
Nothing here knows a protocol or a hook file: Pipeline (pipeline.py) gives the batcher a
function that runs merged inputs.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .errors import BadRequest, DeadlineExceeded, ModelLoadError, ModelUnavailable, SeldonCaffeError

logger = logging.getLogger("seldon_caffe.batching")

Arrays = dict[str, np.ndarray]
Key = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class BatchingConfig:
    """model.yaml's `batching:` mapping (absent: no batching)."""

    max_batch_size: int = 16  # rows in one run
    max_queue_delay_ms: float = 2.0  # how long the oldest request may wait for company
    preferred_batch_size: tuple[int, ...] = ()  # sizes that go at once when reached
    max_queue_size: int = 256  # requests waiting; past it, 503
    timeout_ms: float = 0.0  # a request waiting longer gets 504 (0: no limit)
    hooks_batch_safe: bool = False  # the user's run_model takes merged batches


def parse_batching(raw: Any, problem: Callable[[str, str], None]) -> BatchingConfig | None:
    """Validate model.yaml's `batching:`; `problem(field, message)` raises the ConfigError."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problem("batching", "expected a mapping, e.g. {max_batch_size: 16, max_queue_delay_ms: 2}")
    known = [f.name for f in fields(BatchingConfig)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        problem(f"batching.{unknown[0]}", f"unknown field; allowed: {', '.join(known)}")
    for name in ("max_batch_size", "max_queue_size"):
        value = raw.get(name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problem(f"batching.{name}", f"{value!r} is not a positive integer")
    for name in ("max_queue_delay_ms", "timeout_ms"):
        value = raw.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            problem(f"batching.{name}", f"{value!r} is not a number of milliseconds >= 0")
    preferred = raw.get("preferred_batch_size", [])
    limit = raw.get("max_batch_size", BatchingConfig.max_batch_size)
    if not isinstance(preferred, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= limit for n in preferred
    ):
        problem("batching.preferred_batch_size", f"{preferred!r}: expected a list of sizes from 1 to max_batch_size")
    if not isinstance(raw.get("hooks_batch_safe", False), bool):
        problem("batching.hooks_batch_safe", f"{raw['hooks_batch_safe']!r} is not true or false")
    values: dict[str, Any] = {**raw, "preferred_batch_size": tuple(sorted(preferred))}
    settings: dict[str, Any] = {k: float(v) if k.endswith("_ms") else v for k, v in values.items()}
    return BatchingConfig(**settings)


@dataclass
class BatchPart:
    """One request in a merged run: its ctx and how many rows it brought (`ctx.batch`)."""

    ctx: Any
    rows: int


@dataclass
class _Waiting:
    inputs: Arrays
    rows: int
    ctx: Any
    key: Key
    queued: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when its run began
    finished: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    outputs: Arrays | None = None
    error: BaseException | None = None
    batch_rows: int = 0  # rows of the run that answered it


@dataclass
class Served:
    """What a request gets back from the batcher: its outputs and how it was served."""

    outputs: Arrays
    queue_ms: float  # waiting for its batch
    run_ms: float  # its batch's run
    batch_rows: int


class Batcher:
    """Queues requests' inputs and runs them merged, one run at a time: on the runner thread,
    or in the request's own thread when the model is idle and the delay is 0.

    run(inputs, parts) runs merged inputs; `parts` lists the requests in it (ctx.batch).
    """

    def __init__(self, config: BatchingConfig, run: Callable[[Arrays, list[BatchPart]], Arrays], name: str = ""):
        self.config = config
        self._run = run
        self._queues: dict[Key, collections.deque[_Waiting]] = {}
        self._waiting = 0
        self._busy = False  # a run is in progress (the runner's, or a request's own)
        self._cond = threading.Condition()
        self._closed = False
        self._runner = threading.Thread(target=self._serve, name=f"batcher-{name}", daemon=True)
        self._runner.start()

    @property
    def depth(self) -> int:
        """Requests waiting now."""
        return self._waiting

    def submit(self, inputs: Arrays, ctx: Any) -> Served:
        """Queue one request's validated inputs; wait for its share of a run."""
        rows = _rows(inputs)
        waiting = _Waiting(inputs, rows, ctx, _key(inputs))
        with self._cond:
            if self._closed:
                raise ModelUnavailable("the model is shutting down")
            if self._waiting >= self.config.max_queue_size:
                raise ModelUnavailable(
                    f"{self._waiting} requests are already waiting (batching.max_queue_size "
                    f"{self.config.max_queue_size}); try again shortly"
                )
            alone = not (self._busy or self._waiting or self.config.max_queue_delay_ms)
            if alone:  # idle, nobody to wait for: run it here, at once
                self._busy = True
                waiting.started = waiting.queued
            else:
                self._queues.setdefault(waiting.key, collections.deque()).append(waiting)
                self._waiting += 1
                self._cond.notify()
        if alone:
            self._run_here(waiting)
        else:
            self._await(waiting)
        if waiting.error is not None:
            raise waiting.error
        assert waiting.outputs is not None  # a finished request has outputs or an error
        queue_ms = (waiting.started - waiting.queued) * 1000.0
        return Served(waiting.outputs, queue_ms, (waiting.finished - waiting.started) * 1000.0, waiting.batch_rows)

    def _await(self, waiting: _Waiting) -> None:
        """Wait for the request's answer. With timeout_ms, the request's own thread answers
        504 when its time is up and it is still queued: the runner looks only between runs,
        so a long run would otherwise hold every 504 back until it ends."""
        if self.config.timeout_ms:
            left = waiting.queued + self.config.timeout_ms / 1000.0 - time.monotonic()
            if not waiting.done.wait(max(left, 0.0)):
                with self._cond:
                    if not waiting.started:  # not taken into a run (_take sets it under the lock)
                        self._queues[waiting.key].remove(waiting)
                        self._time_out(waiting)
        waiting.done.wait()

    def _run_here(self, waiting: _Waiting) -> None:
        """Run one request in its own thread, then let the runner take what queued meanwhile."""
        try:
            self._answer([waiting])
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify()

    def close(self) -> None:
        """Answer what waits with 503 and stop the runner."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._runner.join(5)

    # -- the runner -------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            try:
                self._answer(batch)
            finally:
                with self._cond:
                    self._busy = False

    def _next_batch(self) -> list[_Waiting] | None:
        """Wait (under the lock) until a batch is due; take it off its queue.

        A full queue goes at once, whichever key's request is oldest; otherwise the queue of
        the oldest request goes when that request has waited max_queue_delay_ms.
        """
        while True:
            if self._closed:
                self._fail_all(ModelUnavailable("the model is shutting down"))
                return None
            self._expire()
            # Empty queues go: with dynamic dims every new shape is a key of its own.
            self._queues = {key: queue for key, queue in self._queues.items() if queue}
            if not self._queues or self._busy:  # a request's own run ends with a notify
                self._cond.wait()
                continue
            by_age = sorted(self._queues.values(), key=lambda q: q[0].queued)
            full = [queue for queue in by_age if self._full(queue)]
            if full:
                return self._take(full[0])
            left = by_age[0][0].queued + self.config.max_queue_delay_ms / 1000.0 - time.monotonic()
            if left <= 0:
                return self._take(by_age[0])
            self._cond.wait(left)

    def _full(self, queue: collections.deque[_Waiting]) -> bool:
        rows = sum(w.rows for w in queue)
        return rows >= self.config.max_batch_size or rows in self.config.preferred_batch_size

    def _take(self, queue: collections.deque[_Waiting]) -> list[_Waiting]:
        """The oldest requests of `queue` up to max_batch_size rows (at least one request:
        one bigger than the limit runs alone), cut to a preferred size when one fits."""
        taken = [queue.popleft()]
        rows = taken[0].rows
        while queue and rows + queue[0].rows <= self.config.max_batch_size:
            rows += queue[0].rows
            taken.append(queue.popleft())
        preferred = [size for size in self.config.preferred_batch_size if size <= rows]
        if preferred and rows not in self.config.preferred_batch_size:
            while len(taken) > 1 and rows > preferred[-1]:
                rows -= taken[-1].rows
                queue.appendleft(taken.pop())
        self._waiting -= len(taken)
        self._busy = True
        started = time.monotonic()
        for waiting in taken:
            waiting.started = started
        return taken

    def _expire(self) -> None:
        """504 for requests that waited past timeout_ms, before they run (their own threads
        usually answer first: _await; this makes sure none is run late)."""
        if not self.config.timeout_ms:
            return
        limit = time.monotonic() - self.config.timeout_ms / 1000.0
        for queue in self._queues.values():
            while queue and queue[0].queued < limit:
                self._time_out(queue.popleft())

    def _time_out(self, waiting: _Waiting) -> None:
        """Answer 504 to a request just taken off its queue (under the lock)."""
        self._waiting -= 1
        waited = (time.monotonic() - waiting.queued) * 1000.0
        _finish(
            waiting,
            error=DeadlineExceeded(
                f"the request waited {waited:.0f} ms for its batch, past batching.timeout_ms "
                f"{self.config.timeout_ms:g}; the service is overloaded"
            ),
        )

    def _fail_all(self, error: SeldonCaffeError) -> None:
        for queue in self._queues.values():
            while queue:
                _finish(queue.popleft(), error=error)
        self._waiting = 0

    def _answer(self, batch: list[_Waiting]) -> None:
        """Run `batch` merged; on failure, each request alone, so only the culprit fails."""
        try:
            outputs = self._run_merged(batch)
        except _WrongBatchDimension as error:  # every request of the run gets it: the hook's bug
            for waiting in batch:
                _finish(waiting, error=error.error)
            return
        except BaseException as error:
            if len(batch) == 1:
                _finish(batch[0], error=error)
                return
            logger.info("a merged run of %d requests failed (%s): running them one by one", len(batch), error)
            for waiting in batch:
                self._answer([waiting])
            return
        offset, rows = 0, sum(w.rows for w in batch)
        for waiting in batch:
            share = {name: array[offset : offset + waiting.rows] for name, array in outputs.items()}
            offset += waiting.rows
            _finish(waiting, outputs=share, batch_rows=rows)

    def _run_merged(self, batch: list[_Waiting]) -> Arrays:
        names = list(batch[0].inputs)
        if len(batch) == 1:
            merged = batch[0].inputs
        else:
            merged = {name: np.concatenate([w.inputs[name] for w in batch]) for name in names}
        rows = sum(w.rows for w in batch)
        outputs = self._run(merged, [BatchPart(w.ctx, w.rows) for w in batch])
        if not isinstance(outputs, dict):
            raise _WrongBatchDimension(
                SeldonCaffeError(
                    f"run_model returned a {type(outputs).__name__} for a merged batch; expected {{name: array}}"
                )
            )
        for name, array in outputs.items():
            first = np.shape(array)[0] if np.ndim(array) else None
            if first != rows:
                raise _WrongBatchDimension(
                    SeldonCaffeError(
                        f"run_model's output {name!r} has first dimension {first} for a merged batch of {rows} rows; "
                        "with batching on, every output needs one row per input row (batching in model.yaml)"
                    )
                )
        return {name: np.asarray(array) for name, array in outputs.items()}


class _WrongBatchDimension(Exception):
    def __init__(self, error: SeldonCaffeError):
        super().__init__(str(error))
        self.error = error


def _finish(
    waiting: _Waiting, outputs: Arrays | None = None, error: BaseException | None = None, batch_rows: int = 0
) -> None:
    waiting.outputs, waiting.error, waiting.batch_rows = outputs, error, batch_rows
    waiting.finished = time.monotonic()
    waiting.started = waiting.started or waiting.finished  # expired or failed before it ran
    waiting.done.set()


def _rows(inputs: Arrays) -> int:
    counts = {int(array.shape[0]) if array.ndim else -1 for array in inputs.values()}
    if len(counts) != 1 or -1 in counts:
        shapes = ", ".join(f"{name}: {list(array.shape)}" for name, array in inputs.items())
        raise BadRequest(f"with batching on, every input needs the same first (batch) dimension; got {shapes}")
    return counts.pop()


def _key(inputs: Arrays) -> Key:
    return tuple((name, array.dtype.str, tuple(array.shape[1:])) for name, array in sorted(inputs.items()))


def check_batchable(inputs: Sequence[Any], source: str) -> None:
    """Batching needs every input's first dimension dynamic: a start-up error otherwise."""
    fixed = [spec.describe() for spec in inputs if not spec.shape or spec.shape[0] != -1]
    if fixed:
        raise ModelLoadError(
            f"{source}: field 'batching': every input's first dimension must be dynamic (N) to merge requests; "
            f"fixed: {', '.join(fixed)}"
        )
