"""One engine per input shape, for the runtimes that serve a Caffe net through its ONNX
conversion (onnxruntime, openvino, torch).

Caffe reshapes per call, but our ONNX conversion bakes the spatial sizes in (pooling's end
padding and window divisors, Reshape dims, crop offsets...), so a net whose inputs have free
dims (runtimes/caffe_model.py) is converted once per input shape, the batch aside: the batch
stays symbolic, so every batch size of a shape shares its engine. The engines live in a
least-recently-used cache of `bound` entries (the runtime's `shape_cache` option, default
DEFAULT_BOUND), so a client sending ever new sizes costs conversions, not memory:

* the warm-up shapes' engine is built at load, from the on-disk conversion cache
  (_onnx_source.converted_caffe_model), as a net without free dims always was;
* any other shape is checked against the net's shape rules first (a 400 if the net cannot
  take it), then converted in memory and loaded: that first request pays for it
  (docs/benchmarks.md, "A new input size"), later ones of the same shape do not;
* concurrent requests of a new shape wait for one conversion (one slot per shape, filled
  once); a conversion that fails is not kept, so the next request tries again.

Each engine holds its own copy of the weights: the memory a net costs is up to `bound`
times its weights (plus the parsed caffemodel, kept once a second shape has been seen).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .builtin import SHAPE_CACHE
from .caffe_model import CaffeModel, ShapeKey

if TYPE_CHECKING:
    import onnx

    from ..config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_BOUND = SHAPE_CACHE  # engines kept per model: distinct input shapes (the batch aside)


class ShapeCache[E]:
    """Engines of one Caffe net, by input shape. `build(source)` makes an engine from an
    ONNX file path or an onnx.ModelProto; `engine(shapes)` finds or builds the one for a
    request's input shapes ({name: shape}, the batch included and ignored)."""

    def __init__(
        self,
        model: CaffeModel,
        build: Callable[[Path | onnx.ModelProto], E],
        bound: int = DEFAULT_BOUND,
        config: ModelConfig | None = None,
    ) -> None:
        if bound < 1:
            raise ValueError(f"bound must be at least 1, got {bound}")
        self.model = model
        self.bound = bound
        self._build = build
        self._lock = threading.Lock()
        self._slots: collections.OrderedDict[ShapeKey, Future[E]] = collections.OrderedDict()
        # The model directory's files convert into the on-disk cache; a net made in memory converts in memory.
        self.path: Path | None = None
        if config is not None and model.files() is not None:
            from ._onnx_source import converted_caffe_model

            self.path = converted_caffe_model(config, model)
        self.first: E = self.engine(model.warm_shapes)

    @property
    def shapes(self) -> list[ShapeKey]:
        """The shapes with an engine now, least recently used first."""
        with self._lock:
            return [key for key, slot in self._slots.items() if slot.done() and slot.exception() is None]

    def built(self) -> list[E]:
        """The engines built so far (those still cached)."""
        with self._lock:
            return [slot.result() for slot in self._slots.values() if slot.done() and slot.exception() is None]

    def engine(self, shapes: Mapping[str, Any]) -> E:
        """The engine for these input shapes, built (once) if it is not cached."""
        key = self.model.key(shapes)
        with self._lock:
            slot = self._slots.get(key)
            mine = slot is None
            if slot is None:
                slot = self._slots[key] = Future()
            else:
                self._slots.move_to_end(key)
        if not mine:
            return slot.result()
        try:
            engine = self._make(key)
        except BaseException as exc:
            with self._lock:
                self._slots.pop(key, None)
            slot.set_exception(exc)
            raise
        slot.set_result(engine)
        with self._lock:
            self._evict()
        return engine

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()

    def _make(self, key: ShapeKey) -> E:
        """Check the shapes against the net (BadRequest), convert, load."""
        self.model.check(self.model.shapes_of(key))
        if key == self.model.warm_key and self.path is not None:
            return self._build(self.path)
        start = time.perf_counter()
        converted: onnx.ModelProto = self.model.to_onnx(self.model.shapes_of(key))
        engine = self._build(converted)
        logger.info(
            "%s: planned for input shapes %s in %.2f s (%d shapes cached, at most %d)",
            self.model.source,
            _describe(key),
            time.perf_counter() - start,
            len(self._slots),
            self.bound,
        )
        return engine

    def _evict(self) -> None:
        """Drop the least recently used finished engines past the bound (under the lock).
        A request still running on one keeps it alive until it returns."""
        for key in [k for k, slot in self._slots.items() if slot.done()]:
            if len(self._slots) <= self.bound:
                return
            del self._slots[key]
            logger.info(
                "%s: dropped the engine for input shapes %s (shape_cache %d)",
                self.model.source,
                _describe(key),
                self.bound,
            )


def _describe(key: ShapeKey) -> str:
    return ", ".join(f"{name}[N, {', '.join(map(str, dims))}]" for name, dims in key)
