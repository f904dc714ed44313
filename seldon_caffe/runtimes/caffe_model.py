"""A Caffe net as the Caffe runtimes serve it: which input dims a request may choose, the
size to warm up at, the blobs to answer, and each request's sizes checked against the net.

Caffe reshapes a net on every forward, so a request may carry any size the net accepts: a
fully convolutional net takes any image size, and a net that declares a placeholder input
(`input_dim: 1 3 1 1`, as OpenPose publishes it, "defined at runtime") gets its real size
from the caller. Which dims are free is read from the net itself: a dim is free when Caffe's
shape rules (caffe/shapes.py) still hold with that dim changed, at two other sizes, and every
learned blob keeps its shape (an InnerProduct over the image fixes H and W; a Reshape that
spells out the batch fixes the batch). model.yaml `inputs:` may free a dim (-1) or fix one
(a number); its numbers are also the size to warm up and convert at first (e.g.
[-1, 3, 368, 368]). A placeholder dim (declared 1, free) is warmed up at the first of
WARM_SIZES the net takes, never at 1.

Free dims are -1 in the signature (`inputs`, `outputs`, so in the V2 metadata). Before any
engine sees a request of a new size, `check` runs the shape rules on it: a size the net
cannot take is a 400 naming the inputs and the layer that fails, never an engine's crash.

Outputs are the net's unconsumed tops (`CaffeNet.outputs`: a blob read only by Silence
counts as unconsumed), or the blobs model.yaml `outputs:` names, any blob of the net.

`CaffeModel.from_config` serves the model directory's files; `CaffeModel.from_net` serves a
CaffeNet built in memory (a part of a net cut at its Python layers, say), with the same rules.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..caffe import CaffeFormatError, CaffeNet, Shape, caffe_pb2, infer_shapes, param_shapes, read_prototxt
from ..caffe.forks.ssd import data_dependent_axes
from ..caffe.io import read_bytes
from ..caffe.shapes import UnsupportedLayerType
from ..caffe.upgrade import upgrade_net
from ..errors import BadRequest, ModelLoadError
from .base import TensorSpec

if TYPE_CHECKING:
    import onnx

    from ..config import ModelConfig

logger = logging.getLogger(__name__)

Shapes = dict[str, Shape]
ShapeKey = tuple[tuple[str, Shape], ...]
WARM_SIZES = (224, 64, 512)  # a placeholder dim is warmed up at the first of these the net takes
_TRIAL_MIN = 64  # a dim is tried at max(2 * size, 64) and 32 more: sizes any sane net takes
_CHECKED_KEYS = 256  # request sizes remembered as accepted (check() is a full shape inference)


class CaffeModel:
    """The served view of a Caffe net. `inputs` / `outputs` are its signature (-1 = free),
    `warm_shapes` the input shapes to warm up and convert at first, `output_names` the blobs
    it answers. `net()` is the CaffeNet with its weights (read on first use)."""

    def __init__(
        self,
        definition: caffe_pb2.NetParameter,
        *,
        source: str,
        weights: Path | CaffeNet | None,
        inputs: Sequence[Mapping[str, Any]] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> None:
        self.source = source
        self.definition = upgrade_net(definition, source)
        self._weights = weights
        self._net = weights if isinstance(weights, CaffeNet) else None
        self._lock = threading.Lock()  # the accepted sizes
        self._net_lock = threading.Lock()  # parsing the caffemodel (seconds, for a big net)
        self._accepted: collections.OrderedDict[ShapeKey, None] = collections.OrderedDict()
        declared = _declared_inputs(self.definition, source)
        stated = _stated_dims(inputs, declared, source)
        self.reference, blobs, self._params = self._reference(declared, stated)
        if self.reference != declared:  # the declared sizes do not even infer: build at the reference
            self.definition = _with_input_shapes(self.definition, self.reference)
        self.output_names = _answers(
            outputs, blobs, CaffeNet(self.definition, source=source).outputs, self.definition, source
        )
        trials = self._trials(stated)
        passed = {(name, dim) for name, dim, _ in trials}
        self.free = {
            name: tuple(stated[name][i] == -1 or (name, i) in passed for i in range(len(shape)))
            for name, shape in self.reference.items()
        }
        self.warm_shapes, self.placeholder = self._warm()
        self.inputs = [TensorSpec(n, "float32", _free_dims(s, self.free[n])) for n, s in self.reference.items()]
        self.outputs = self._output_specs(blobs, [b for _, _, b in trials])

    # -- building ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig) -> CaffeModel:
        """The model directory's Caffe files, with model.yaml's `inputs` and `outputs`."""
        prototxt = config.files["prototxt"]
        names = [entry["name"] for entry in config.outputs] if config.outputs else None
        return cls(
            read_prototxt(prototxt),
            source=str(prototxt),
            weights=Path(config.files["weights"]),
            inputs=config.inputs,
            outputs=names,
        )

    @classmethod
    def from_net(
        cls,
        net: CaffeNet,
        inputs: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[int]] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> CaffeModel:
        """A CaffeNet in memory (with weights). `inputs`: model.yaml-style entries, or
        {name: shape} (-1 = free); `outputs`: blob names (default: the net's outputs)."""
        if isinstance(inputs, Mapping):
            inputs = [{"name": name, "shape": list(shape)} for name, shape in inputs.items()]
        return cls(net.definition, source=net.source, weights=net, inputs=inputs, outputs=outputs)

    def net(self) -> CaffeNet:
        """The CaffeNet with its weights: parsed from the caffemodel once, on first use."""
        with self._net_lock:
            if self._net is None:
                path = self._weights
                assert isinstance(path, Path)  # from_net passes the net itself
                self._net = CaffeNet(
                    self.definition, read_bytes(path, "caffemodel"), source=self.source, weights_source=str(path)
                )
            return self._net

    def files(self) -> tuple[Path, Path] | None:
        """(prototxt, caffemodel) on disk when the model comes from files (its cache key)."""
        return (Path(self.source), self._weights) if isinstance(self._weights, Path) else None

    def to_onnx(self, shapes: Mapping[str, Shape] | None = None) -> onnx.ModelProto:
        """The net's ONNX conversion at `shapes` (default: the warm-up shapes), symbolic batch
        unless the net fixes it, exposing `output_names`."""
        from ..caffe.to_onnx import caffe_to_onnx

        net, shapes = self.net(), shapes or self.warm_shapes
        try:
            return caffe_to_onnx(net, input_shapes=shapes, outputs=self.output_names, progress=False)
        except CaffeFormatError as exc:
            if "--batch" not in str(exc):
                raise
            # A net that fixes its batch size converts at that size: serve it as Caffe would.
            logger.warning("%s; converting at the declared batch size", exc)
            batch = next((shape[0] for shape in self.reference.values() if shape), 1)
            return caffe_to_onnx(net, batch=batch, input_shapes=shapes, outputs=self.output_names, progress=False)

    # -- requests ------------------------------------------------------------------------

    @property
    def has_free_dims(self) -> bool:
        """Whether a request may change any dim but the batch (else one engine serves all)."""
        return any(any(free[1:]) for free in self.free.values())

    def key(self, shapes: Mapping[str, Sequence[int]]) -> ShapeKey:
        """What an engine is planned for: every input's dims but the batch, in input order."""
        return tuple((name, tuple(int(d) for d in shapes[name][1:])) for name in self.reference)

    def shapes_of(self, key: ShapeKey) -> Shapes:
        """The input shapes a key stands for, at the reference batch."""
        return {name: (self.reference[name][0], *dims) for name, dims in key}

    @property
    def warm_key(self) -> ShapeKey:
        return self.key(self.warm_shapes)

    def check(self, shapes: Mapping[str, Sequence[int]]) -> ShapeKey:
        """The key of a request's input shapes, once the net is known to take them: a
        BadRequest naming the inputs, the layer that fails and a size that works if not."""
        key = self.key(shapes)
        with self._lock:
            if key in self._accepted:
                self._accepted.move_to_end(key)
                return key
        try:
            self._plan(self.shapes_of(key))
        except CaffeFormatError as exc:
            sent = ", ".join(f"{name}{list(shapes[name])}" for name in self.reference)
            takes = "; ".join(spec.describe() for spec in self.inputs)
            example = ", ".join(f"{name}{list(shape)}" for name, shape in self.warm_shapes.items())
            raise BadRequest(
                f"the net cannot take inputs {sent}: {exc}; it takes {takes} at sizes every layer can "
                f"process, e.g. {example}"
            ) from None
        with self._lock:
            self._accepted[key] = None
            while len(self._accepted) > _CHECKED_KEYS:
                self._accepted.popitem(last=False)
        return key

    def zeros(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero inputs at the warm-up shapes and `batch` (where the batch is free)."""
        return {
            spec.name: np.zeros((batch if spec.shape[0] == -1 else shape[0], *shape[1:]), np.float32)
            for spec, shape in zip(self.inputs, self.warm_shapes.values(), strict=True)
        }

    # -- analysis ------------------------------------------------------------------------

    def _plan(self, shapes: Mapping[str, Shape]) -> Shapes:
        """Every blob's shape at input `shapes`; a CaffeFormatError where the net cannot take
        them, including a learned blob that would change shape (the weights fix it)."""
        blobs = infer_shapes(self.definition, shapes)
        for layer in self.definition.layer:
            empty = [top for top in layer.top if 0 in blobs[top]]
            if empty:  # Caffe would allocate nothing and crash or answer nothing
                raise CaffeFormatError(
                    f"layer {layer.name!r} ({layer.type}) would produce an empty blob {empty[0]!r} "
                    f"{list(blobs[empty[0]])}: the input is too small for the layers up to it"
                )
            expected = self._params.get(layer.name)
            if expected is None:
                continue
            got = param_shapes(layer, [blobs[b] for b in layer.bottom])
            if got != expected:
                raise CaffeFormatError(
                    f"layer {layer.name!r} ({layer.type}) would need weights of shapes {[list(s) for s in got]}, "
                    f"but has {[list(s) for s in expected]}"
                )
        return blobs

    def _reference(self, declared: Shapes, stated: dict[str, list[int | None]]) -> tuple[Shapes, Shapes, dict]:
        """The sizes the analysis starts from: declared, with model.yaml's numbers; where the
        net cannot take those, the placeholder dims (declared 1) at the first of WARM_SIZES
        that it takes. Returns them, the blob shapes there, and the learned blobs' shapes."""
        first = {name: _fixed(shape, stated[name]) for name, shape in declared.items()}
        open_dims = {name: [s in (None, -1) for s in dims] for name, dims in stated.items()}
        candidates = [first] + [_placeholders_at(first, open_dims, size) for size in WARM_SIZES]
        error: CaffeFormatError | None = None
        for shapes in candidates:
            try:
                blobs = infer_shapes(self.definition, shapes)
            except UnsupportedLayerType as exc:  # its message says the ways forward; no size would help
                raise UnsupportedLayerType(f"{self.source}: {exc}") from None
            except CaffeFormatError as exc:
                error = error or exc
                continue
            params = {la.name: param_shapes(la, [blobs[b] for b in la.bottom]) for la in self.definition.layer}
            return shapes, blobs, {name: shapes_ for name, shapes_ in params.items() if shapes_}
        stated_any = any(d is not None for dims in stated.values() for d in dims)
        fix = "fix the sizes in model.yaml inputs" if not stated_any else "change the shapes in model.yaml inputs"
        raise ModelLoadError(f"{self.source}: the net cannot take its declared input shapes ({error}); {fix}")

    def _trials(self, stated: dict[str, list[int | None]]) -> list[tuple[str, int, Shapes]]:
        """(input, dim, blob shapes) for each dim model.yaml does not fix that the net takes at
        two other sizes: those are the free dims. The batch is tried for all inputs at once
        (at 2 and 3, or 1 and 2): their batches go together through a Concat or an Eltwise."""
        passed: list[tuple[str, int, Shapes]] = []
        batched = [name for name, shape in self.reference.items() if shape and stated[name][0] in (None, -1)]
        if batched:
            sizes = _other_sizes(0, self.reference[batched[0]][0])
            results = [self._try({name: {0: size} for name in batched}) for size in sizes]
            if all(r is not None for r in results):
                passed.extend((name, 0, blobs) for name in batched for blobs in results if blobs is not None)
        for name, shape in self.reference.items():
            for dim, size in enumerate(shape):
                if dim == 0 or stated[name][dim] not in (None, -1):
                    continue
                results = [self._try({name: {dim: other}}) for other in _other_sizes(dim, size)]
                if all(r is not None for r in results):
                    passed.extend((name, dim, blobs) for blobs in results if blobs is not None)
        return passed

    def _try(self, changes: Mapping[str, Mapping[int, int]]) -> Shapes | None:
        """The blob shapes with the reference's dims changed ({input: {dim: size}}), or None."""
        shapes = {
            name: tuple(changes.get(name, {}).get(i, d) for i, d in enumerate(shape))
            for name, shape in self.reference.items()
        }
        try:
            return self._plan(shapes)
        except CaffeFormatError:
            return None

    def _warm(self) -> tuple[Shapes, bool]:
        """(warm-up shapes, whether they still hold a placeholder dim of 1): the reference,
        with its free placeholder dims at the first of WARM_SIZES the net takes."""
        if _placeholders_at(self.reference, self.free, 1) == _placeholders_at(self.reference, self.free, 2):
            return dict(self.reference), False  # no free spatial dim of 1: nothing to place
        for size in WARM_SIZES:
            shapes = _placeholders_at(self.reference, self.free, size)
            try:
                self._plan(shapes)
            except CaffeFormatError:
                continue
            return shapes, False
        logger.warning("%s: the net takes none of %s for its placeholder input dims", self.source, WARM_SIZES)
        return dict(self.reference), True

    def _output_specs(self, blobs: Shapes, others: list[Shapes]) -> list[TensorSpec]:
        """The answers' specs: a dim that changed in any trial is -1, and so is one the data
        decides (DetectionOutput's row count: forks/ssd.py data_dependent_axes)."""
        by_data = data_dependent_axes(self.definition)
        specs = []
        for name in self.output_names:
            shape = blobs[name]
            varied = tuple(
                i in by_data.get(name, ()) or any(len(o[name]) == len(shape) and o[name][i] != d for o in others)
                for i, d in enumerate(shape)
            )
            specs.append(TensorSpec(name, "float32", _free_dims(shape, varied)))
        return specs


# -- helpers --------------------------------------------------------------------------------


def _declared_inputs(net: caffe_pb2.NetParameter, source: str) -> Shapes:
    """The Input tops' declared shapes (the batch included), as Caffe's Input layer reads them."""
    shapes: Shapes = {}
    for layer in net.layer:
        if layer.type != "Input":
            continue
        declared = [tuple(int(d) for d in s.dim) for s in layer.input_param.shape]
        for i, top in enumerate(layer.top):
            if not declared:
                raise CaffeFormatError(f"{source}: layer {layer.name!r} (Input) gives no shape for input {top!r}")
            shapes[top] = declared[0 if len(declared) == 1 else min(i, len(declared) - 1)]
    return shapes


def _stated_dims(
    entries: Sequence[Mapping[str, Any]] | None, declared: Shapes, source: str
) -> dict[str, list[int | None]]:
    """model.yaml's word on each input dim: a size, -1 (free), or None (the net decides)."""
    stated: dict[str, list[int | None]] = {name: [None] * len(shape) for name, shape in declared.items()}
    for entry in entries or ():
        name, shape = entry["name"], entry.get("shape")
        if name not in declared:
            raise ModelLoadError(
                f"{source}: model.yaml field 'inputs': the model has no input {name!r}; it has {', '.join(declared)}"
            )
        if shape is None:
            continue
        if len(shape) != len(declared[name]):
            raise ModelLoadError(
                f"{source}: model.yaml field 'inputs': {name!r} has {len(declared[name])} dims "
                f"({list(declared[name])} in the prototxt), not {len(shape)} ({list(shape)})"
            )
        stated[name] = [int(d) if d >= 0 else -1 for d in shape]
    return stated


def _fixed(shape: Shape, stated: list[int | None]) -> Shape:
    """`shape` with model.yaml's sizes (the -1s and unstated dims keep the declared size)."""
    return tuple(d if s is None or s == -1 else s for d, s in zip(shape, stated, strict=True))


def _placeholders_at(shapes: Shapes, open_dims: Mapping[str, Sequence[bool]], size: int) -> Shapes:
    """`shapes` with every spatial dim (after N and C) of 1 that `open_dims` allows set to `size`."""
    return {
        name: tuple(size if i >= 2 and d == 1 and open_dims[name][i] else d for i, d in enumerate(shape))
        for name, shape in shapes.items()
    }


def _other_sizes(dim: int, size: int) -> tuple[int, int]:
    """Two sizes to try a dim at: for the batch, two of 1, 2 and 3 (as the converter's symbolic
    batch does); for any other, larger ones, 32 apart (nets that halve a size five times still
    take them)."""
    if dim == 0:
        return (2, 3) if size == 1 else (1, 2)
    larger = max(2 * size, _TRIAL_MIN)
    return larger, larger + 32


def _free_dims(shape: Shape, free: tuple[bool, ...]) -> tuple[int, ...]:
    return tuple(-1 if f else d for d, f in zip(shape, free, strict=True))


def _answers(
    names: Sequence[str] | None, blobs: Shapes, unconsumed: list[str], net: caffe_pb2.NetParameter, source: str
) -> list[str]:
    """The blobs to answer: model.yaml's (any blob a layer writes), else the net's outputs."""
    if not names:
        answers = unconsumed
        if not answers:
            raise ModelLoadError(
                f"{source}: the net has no output blob; name the blobs to answer in model.yaml outputs"
            )
        return answers
    unknown = [name for name in names if name not in blobs]
    if unknown:
        raise ModelLoadError(
            f"{source}: model.yaml field 'outputs': the net has no blob {unknown[0]!r}; "
            f"any of its blobs can be an output: {', '.join(blobs)}"
        )
    inputs = {top for layer in net.layer if layer.type == "Input" for top in layer.top}
    rewritten = {top for layer in net.layer if layer.type != "Input" for top in layer.top}
    echoed = [name for name in names if name in inputs and name not in rewritten]
    if echoed:
        raise ModelLoadError(
            f"{source}: model.yaml field 'outputs': {echoed[0]!r} is an input of the net, which no layer "
            "changes: its value is the request's own; name the blobs layers write"
        )
    if len(set(names)) != len(names):
        raise ModelLoadError(f"{source}: model.yaml field 'outputs' names a blob twice: {', '.join(names)}")
    return list(names)


def _with_input_shapes(net: caffe_pb2.NetParameter, shapes: Mapping[str, Shape]) -> caffe_pb2.NetParameter:
    """A copy of `net` whose Input layers declare `shapes` (one shape per top)."""
    copy = caffe_pb2.NetParameter()
    copy.CopyFrom(net)
    for layer in copy.layer:
        if layer.type == "Input":
            layer.input_param.ClearField("shape")
            for top in layer.top:
                layer.input_param.shape.add().dim.extend(shapes[top])
    return copy
