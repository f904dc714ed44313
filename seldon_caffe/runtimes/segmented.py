"""A Caffe net with Python layers on a fast engine: the net cut at its Python layers.

No engine can run a Python layer (it is the user's code), so the net is cut there: each run
of layers between Python layers is a part, a net of its own whose Input layers are the blobs
that cross the cut, served by the chosen engine (opencv, onnxruntime, openvino, torch) with
`load_caffe_runtime`; the Python layers run in this process in between (caffe/python_layer.py,
Caffe's setup / reshape / forward contract). Layers run in the net's order, as in Caffe.

Shapes: a Python layer's tops are what its setup + reshape give at the bottoms' declared
shapes, as Caffe finds them at net init; per call, its forward may give other sizes (a
proposal layer's count of ROIs). The part after it takes them: its inputs' free dims are
found by the part's own shape analysis (runtimes/caffe_model.py: the ROIs' first dim is free
when no layer fixes it), and an engine that plans per shape re-plans within its bounded
cache. Sizes the part cannot take are a 500 naming the Python layer (its output is not the
client's doing); a part whose input is empty (no ROIs) answers empty blobs, as Caffe would,
without running the engine.

The signature: the net's inputs (free dims as the first part that reads them says; an input
only Python layers read has a free first dim), and the net's outputs, or the blobs model.yaml
`outputs:` names (any blob a part or a Python layer writes). A Python layer's top has every
dim free (-1): its class decides them. Batching (model.yaml `batching:`) needs answers whose
rows follow the requests' rows, which a Python layer that changes the row count does not give.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..caffe import CaffeNet, Shape, caffe_pb2, infer_shapes, load_caffe_net, read_prototxt
from ..caffe._geometry import LayerError
from ..caffe.net import WeightsError
from ..caffe.python_layer import PythonLayer, PythonLayerError, model_directory, python_layers
from ..errors import BadRequest, ModelLoadError
from .base import Arrays, Runtime, TensorSpec

if TYPE_CHECKING:
    from ..config import ModelConfig

logger = logging.getLogger(__name__)

INPUT_SUFFIX = "@in"  # a part input the part rewrites in place is renamed, so it can be an output too


def has_python_layers(config: ModelConfig) -> bool:
    """Whether the model directory's Caffe net has Python layers (then `SegmentedRuntime`)."""
    if config.format != "caffe":
        return False
    try:
        return bool(python_layers(read_prototxt(config.files["prototxt"])))
    except Exception:  # an unreadable prototxt is reported by the runtime that loads it
        return False


@dataclass
class _Part:
    """Layers between Python layers: a net of their own, served by an engine."""

    layers: list[caffe_pb2.LayerParameter]
    inputs: list[str] = field(default_factory=list)  # blobs read before the part writes them
    outputs: list[str] = field(default_factory=list)  # blobs later steps read, or answers
    after: dict[str, str] = field(default_factory=dict)  # input blob -> the Python layer that wrote it
    runtime: Runtime | None = None
    definition: caffe_pb2.NetParameter | None = None
    feed_names: dict[str, str] = field(default_factory=dict)  # blob -> the part net's input name

    @property
    def writes(self) -> list[str]:
        return list(dict.fromkeys(top for layer in self.layers for top in layer.top))

    def reads(self) -> list[str]:
        written: set[str] = set()
        reads: dict[str, None] = {}
        for layer in self.layers:
            reads.update((b, None) for b in layer.bottom if b not in written)
            written.update(layer.top)
        return list(reads)

    def run(self, values: dict[str, np.ndarray]) -> None:
        assert self.runtime is not None and self.definition is not None
        feed = {self.feed_names[name]: values[name] for name in self.inputs}
        if any(values[name].size == 0 for name in self.after):
            values.update(self._empty(feed))
            return
        try:
            values.update(self.runtime.run(feed, self.outputs))
        except BadRequest as exc:
            if not self.after:
                raise  # the request's own inputs: the client's to fix
            raise PythonLayerError(f"the layers after {self._producers()} cannot take its output: {exc}") from None

    def _empty(self, feed: Arrays) -> Arrays:
        """Empty tops for an empty input (no ROIs), as Caffe gives them, without the engine."""
        assert self.definition is not None
        shapes = infer_shapes(self.definition, {name: array.shape for name, array in feed.items()})
        filled = [name for name in self.outputs if 0 not in shapes[name]]
        if filled:
            raise PythonLayerError(
                f"{self._producers()} gave an empty blob, and the layers after it would still make "
                f"{filled[0]!r} of shape {list(shapes[filled[0]])} from it, which no engine here computes"
            )
        return {name: np.zeros(shapes[name], np.float32) for name in self.outputs}

    def _producers(self) -> str:
        names = sorted(set(self.after.values()))
        return "Python layer" + ("s " if len(names) > 1 else " ") + ", ".join(repr(n) for n in names)


@dataclass
class _PythonStep:
    """A Python layer: its code, set up once, runs on the current values of its bottoms."""

    layer: caffe_pb2.LayerParameter
    code: PythonLayer | None = None

    def run(self, values: dict[str, np.ndarray]) -> None:
        assert self.code is not None
        tops = self.code.run([values[name] for name in self.layer.bottom])
        values.update(zip(self.layer.top, tops, strict=True))


Step = _Part | _PythonStep


def cut(net: caffe_pb2.NetParameter, answers: Sequence[str]) -> list[Step]:
    """The net's layers (Input aside) as parts and Python layers, in order, with each part's
    inputs and the outputs later steps need; parts nothing needs are left out."""
    steps: list[Step] = []
    for layer in net.layer:
        if layer.type == "Input":
            continue
        if layer.type == "Python":
            steps.append(_PythonStep(layer))
        elif steps and isinstance(steps[-1], _Part):
            steps[-1].layers.append(layer)
        else:
            steps.append(_Part([layer]))
    needed = set(answers)
    kept: list[Step] = []
    for step in reversed(steps):
        if isinstance(step, _PythonStep):
            needed = (needed - set(step.layer.top)) | set(step.layer.bottom)
            kept.append(step)
            continue
        step.outputs = [blob for blob in step.writes if blob in needed]
        if not step.outputs:
            continue
        step.inputs = step.reads()
        needed = (needed - set(step.writes)) | set(step.inputs)
        kept.append(step)
    kept.reverse()
    _note_producers(kept)
    return kept


def _note_producers(steps: list[Step]) -> None:
    """For each part, which of its inputs a Python layer wrote last (for error messages)."""
    writer: dict[str, str | None] = {}  # blob -> the Python layer that wrote it last (None: a part)
    for step in steps:
        if isinstance(step, _PythonStep):
            writer.update((top, step.layer.name) for top in step.layer.top)
        else:
            step.after = {name: by for name in step.inputs if (by := writer.get(name))}
            writer.update((top, None) for top in step.writes)


def part_definition(part: _Part, shapes: dict[str, Shape], name: str) -> caffe_pb2.NetParameter:
    """The part as a net: an Input layer per input blob (at its shape in the whole net), then
    its layers. An input the part rewrites in place is renamed (`INPUT_SUFFIX`) up to that
    layer, so the blob's new value can be an output under its own name."""
    net = caffe_pb2.NetParameter(name=name)
    rewritten = {top for layer in part.layers for top in layer.top if top in part.inputs}
    part.feed_names = {blob: blob + INPUT_SUFFIX if blob in rewritten else blob for blob in part.inputs}
    taken = {layer.name for layer in part.layers}
    for blob in part.inputs:
        layer = net.layer.add(name=_free_name(f"input {blob}", taken), type="Input", top=[part.feed_names[blob]])
        layer.input_param.shape.add().dim.extend(shapes[blob])
    pending = set(rewritten)
    for original in part.layers:
        layer = net.layer.add()
        layer.CopyFrom(original)
        for i, bottom in enumerate(layer.bottom):
            if bottom in pending:
                layer.bottom[i] = part.feed_names[bottom]
        pending -= set(layer.top)
    return net


def _free_name(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name} {n}"
    taken.add(candidate)
    return candidate


def part_net(whole: CaffeNet, definition: caffe_pb2.NetParameter) -> CaffeNet:
    """The part's CaffeNet, holding the whole net's weights of its layers."""
    net = CaffeNet(definition, source=f"{whole.source} [{definition.name}]")
    for layer in definition.layer:
        try:
            whole.weight_shapes(layer.name)
        except WeightsError:
            continue  # a layer that learns nothing
        net.set_weights(layer.name, whole.get_weights(layer.name))
    return net


class SegmentedRuntime(Runtime):
    """The net's parts on engine `engine`, its Python layers in this process between them."""

    def __init__(self, config: ModelConfig, engine: str) -> None:
        self.name = engine
        self.config = config
        root = config.model_dir
        with model_directory(root):
            whole = load_caffe_net(config.files["prototxt"], config.files["weights"])
            shapes = infer_shapes(whole.definition, _stated_shapes(whole, config))
        answers = [entry["name"] for entry in config.outputs] if config.outputs else list(whole.outputs)
        _check_answers(whole, answers, config)
        self.steps = cut(whole.definition, answers)
        self.parts: list[Runtime] = []
        try:
            for index, step in enumerate(self.steps):
                if isinstance(step, _PythonStep):
                    step.code = _set_up(step.layer, shapes, root, whole.source)
                else:
                    self.parts.append(self._load_part(step, index, whole, shapes))
        except BaseException:
            self.close()
            raise
        self.native = tuple(part.native for part in self.parts)
        self.inputs = self._input_specs(whole, shapes)
        self.outputs = self._output_specs(answers)
        logger.info(
            "%s: %d part(s) on %s around Python layer(s) %s",
            whole.source,
            len(self.parts),
            engine,
            ", ".join(python_layers(whole.definition)),
        )

    def _load_part(self, part: _Part, index: int, whole: CaffeNet, shapes: dict[str, Shape]) -> Runtime:
        from . import load_caffe_runtime  # runtimes/__init__.py imports this module

        part.definition = part_definition(part, shapes, f"{whole.definition.name or 'net'} part {index}")
        stated = [e for e in self.config.inputs or () if e.get("shape") and e["name"] in part.inputs]
        inputs = {part.feed_names[e["name"]]: e["shape"] for e in stated}  # model.yaml's word on the net's inputs
        runtime = load_caffe_runtime(self.name, self.config, part_net(whole, part.definition), inputs, part.outputs)
        runtime.allow_non_finite = True  # the request's inputs are checked once, by this runtime
        part.runtime = runtime
        return runtime

    def _input_specs(self, whole: CaffeNet, shapes: dict[str, Shape]) -> list[TensorSpec]:
        """The net's inputs as the first part that reads each takes it (its warm-up shape the
        example), else with a free first dim (an input only Python layers read)."""
        specs: dict[str, TensorSpec] = {}
        self.example_shapes = {}
        for step in self.steps:
            if not isinstance(step, _Part) or step.runtime is None:
                continue
            seen = {spec.name: spec for spec in step.runtime.inputs}
            examples = step.runtime.example_shapes or {}
            for blob in step.inputs:
                name = step.feed_names[blob]
                if blob in whole.input_shapes and blob not in specs:
                    specs[blob] = replace(seen[name], name=blob)
                    self.example_shapes[blob] = tuple(examples.get(name, shapes[blob]))
        for name in whole.input_shapes:
            if name not in specs:
                specs[name] = TensorSpec(name, "float32", (-1, *shapes[name][1:]))
                self.example_shapes[name] = shapes[name]
        return [specs[name] for name in whole.input_shapes]

    def _output_specs(self, answers: list[str]) -> list[TensorSpec]:
        """Each answer as the step that writes it last describes it (a Python layer: all -1)."""
        specs: dict[str, TensorSpec] = {}
        for step in self.steps:
            if isinstance(step, _PythonStep):
                assert step.code is not None
                tops = zip(step.layer.top, step.code.top_shapes, strict=True)
                specs.update((top, TensorSpec(top, "float32", (-1,) * len(shape))) for top, shape in tops)
            elif step.runtime is not None:
                specs.update((spec.name, spec) for spec in step.runtime.outputs)
        return [specs[name] for name in answers]

    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        values = dict(feed)
        for step in self.steps:
            step.run(values)
        return {name: values[name] for name in outputs}

    def get_weights(self, layer: str) -> list[np.ndarray]:
        return self._part_of(layer).get_weights(layer)

    def set_weights(self, layer: str, arrays: Sequence[np.ndarray]) -> None:
        self._part_of(layer).set_weights(layer, arrays)

    def _part_of(self, layer: str) -> Runtime:
        for step in self.steps:
            if isinstance(step, _Part) and step.runtime is not None and any(la.name == layer for la in step.layers):
                return step.runtime
        names = [la.name for step in self.steps if isinstance(step, _Part) for la in step.layers]
        raise WeightsError(f"no layer named {layer!r} runs on the engine; its layers: {', '.join(names)}")

    def close(self) -> None:
        for part in self.parts:
            part.close()
        self.parts = []
        self.native = None


def _stated_shapes(net: CaffeNet, config: ModelConfig) -> dict[str, Shape]:
    """The input shapes to set the net up at: declared, with model.yaml `inputs:` numbers."""
    shapes = dict(net.input_shapes)
    for entry in config.inputs or ():
        declared, stated = shapes.get(entry["name"]), entry.get("shape")
        if declared is not None and stated and len(stated) == len(declared):
            shapes[entry["name"]] = tuple(d if s < 0 else s for d, s in zip(declared, stated, strict=True))
    return shapes


def _check_answers(net: CaffeNet, answers: list[str], config: ModelConfig) -> None:
    written = {top for layer in net.definition.layer if layer.type != "Input" for top in layer.top}
    unknown = [name for name in answers if name not in written]
    if unknown:
        raise ModelLoadError(
            f"{config.source}: field 'outputs': no layer writes a blob named {unknown[0]!r}; "
            f"any blob a layer writes can be an output: {', '.join(b for b in net.shapes if b in written)}"
        )


def _set_up(layer: caffe_pb2.LayerParameter, shapes: dict[str, Shape], root: Path, source: str) -> PythonLayer:
    """The layer's code, made and set up at its bottoms' shapes (a load error if it fails)."""
    try:
        return PythonLayer(layer, [shapes[b] for b in layer.bottom], root)
    except LayerError as exc:
        raise ModelLoadError(f"{source}: layer {layer.name!r} (Python): {exc}") from None
