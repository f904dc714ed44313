"""`seldon-caffe convert tensorflow`: a SavedModel plus config.txt to ONNX, through tf2onnx.

tf2onnx is the converter the ONNX project keeps for TensorFlow, so we drive it rather than
write our own. What we add is dl_inference's contract: config.txt says which tensors go in
and out and what to call them, and the result is checked against TensorFlow itself.

A config.txt `node_name` may be any of the names a user meets for a tensor: the signature's
key (`image`, `output_0`), the graph tensor behind it (`image:0`, `Identity:0`), or, for an
output, any tensor inside the graph (`functional/probs/Softmax:0`), which cuts the model
there, as dl_inference's frozen-graph converter did. The ONNX model's inputs and outputs
take config.txt's `name`s and `dims` (-1 stays dynamic).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..errors import SeldonCaffeError
from . import _Subparsers, add_tolerance, opset_type
from .check import DEFAULT_TOLERANCE, OutputError, check_conversion, check_signature, format_errors
from .description import ModelDescription, TensorDescription, load_description

DEFAULT_SIGNATURE = "serving_default"
DEFAULT_TAG = "serve"


def add_parser(formats: _Subparsers) -> None:
    parser = formats.add_parser(
        "tensorflow",
        help="TensorFlow SavedModel + config.txt -> ONNX (tf2onnx), checked against TensorFlow",
        description="Convert a SavedModel to ONNX with the inputs and outputs config.txt describes (docs/convert.md).",
    )
    parser.add_argument("saved_model", type=Path, help="the SavedModel directory (holding saved_model.pb)")
    parser.add_argument("--config", type=Path, required=True, help="config.txt: the model description")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--signature", default=DEFAULT_SIGNATURE, help="the SavedModel signature to convert")
    parser.add_argument("--tag", default=DEFAULT_TAG, help="the SavedModel tag set (comma-separated)")
    parser.add_argument("--opset", type=opset_type, help="ONNX opset (default: tf2onnx's)")
    add_tolerance(parser)
    parser.set_defaults(handler=convert_tensorflow_command)


def convert_tensorflow_command(args: argparse.Namespace) -> int:
    description = load_description(args.config)
    started = time.perf_counter()
    errors = saved_model_to_onnx(
        args.saved_model,
        description,
        args.output,
        signature=args.signature,
        tag=args.tag,
        opset=args.opset,
        tolerance=args.tolerance,
    )
    print(f"wrote {args.output} ({time.perf_counter() - started:.1f} s)")
    print(format_errors(errors, "TensorFlow"))
    return 0


def saved_model_to_onnx(
    saved_model: Path,
    description: ModelDescription,
    output: Path,
    *,
    signature: str = DEFAULT_SIGNATURE,
    tag: str = DEFAULT_TAG,
    opset: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[OutputError]:
    """Write the ONNX conversion of `saved_model` to `output`; return each output's error against TensorFlow."""
    saved_model = Path(saved_model)
    if not (saved_model / "saved_model.pb").is_file():
        raise SeldonCaffeError(f"{saved_model}: not a SavedModel directory (no saved_model.pb in it)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides our report
    from ..quantize import _require

    _require("tensorflow", "tf2onnx", "onnx", "onnxruntime")
    from tf2onnx import convert

    graph = _FrozenSignature(saved_model, signature, tag)
    inputs = {graph.input_tensor(t): t for t in description.inputs}
    outputs = {graph.output_tensor(t): t for t in description.outputs}
    convert.from_graph_def(
        graph.graph_def,
        input_names=list(inputs),
        output_names=list(outputs),
        opset=opset,
        shape_override={tensor: [None if d == -1 else d for d in t.dims] for tensor, t in inputs.items()},
        tensors_to_rename={tensor: t.name for tensor, t in {**inputs, **outputs}.items()},
        output_path=str(output),
    )
    check_signature(output, description)
    return check_conversion(output, description, graph.reference(inputs, outputs), "TensorFlow", tolerance)


class _FrozenSignature:
    """One SavedModel signature, frozen the way tf2onnx converts it, and its names."""

    def __init__(self, saved_model: Path, signature: str, tag: str):
        from tf2onnx import tf_loader

        self.saved_model, self.signature, self.tags = saved_model, signature, tag.split(",")
        try:
            loaded = tf_loader.from_saved_model(
                str(saved_model), None, None, tag, [signature], return_tensors_to_rename=True
            )
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise SeldonCaffeError(f"{saved_model}: cannot load signature {signature!r} (tag {tag!r}): {exc}") from None
        self.graph_def, self.inputs, self.outputs, renames = loaded
        self.key_of = dict(renames)  # graph tensor -> signature key
        self.tensor_of = {key: tensor for tensor, key in renames.items()}
        self.nodes = {node.name for node in self.graph_def.node}

    def input_tensor(self, tensor: TensorDescription) -> str:
        found = self._signature_tensor(tensor.node_name, self.inputs)
        if found is None:
            raise self._unknown("input", tensor, self.inputs)
        return found

    def output_tensor(self, tensor: TensorDescription) -> str:
        found = self._signature_tensor(tensor.node_name, self.outputs)
        if found is None:  # a tensor inside the graph: the conversion stops there
            name = tensor.node_name if ":" in tensor.node_name else f"{tensor.node_name}:0"
            found = name if name.rpartition(":")[0] in self.nodes else None
        if found is None:
            raise self._unknown("output", tensor, self.outputs)
        return found

    def _signature_tensor(self, name: str, tensors: list[str]) -> str | None:
        for candidate in (name, self.tensor_of.get(name), f"{name}:0"):
            if candidate in tensors:
                return candidate
        return None

    def _unknown(self, kind: str, tensor: TensorDescription, tensors: list[str]) -> SeldonCaffeError:
        names = ", ".join(f"{self.key_of.get(t, t)} ({t})" for t in tensors)
        return SeldonCaffeError(
            f"config.txt {kind} {tensor.name!r}: node_name {tensor.node_name!r} is not in signature "
            f"{self.signature!r} of {self.saved_model}; its {kind}s are {names}"
        )

    def reference(self, inputs: dict[str, TensorDescription], outputs: dict[str, TensorDescription]):  # noqa: ANN201
        """A function {input name: array} -> {output name: array} that runs TensorFlow.

        Signature outputs run through the SavedModel's own signature function, as TensorFlow
        Serving would; a cut inside the graph can only run on the frozen graph."""
        import tensorflow as tf

        if all(tensor in self.outputs for tensor in outputs):
            function = tf.saved_model.load(str(self.saved_model), tags=self.tags).signatures[self.signature]

            def run_signature(arrays: dict) -> dict:
                feed = {self.key_of[tensor]: tf.constant(arrays[t.name]) for tensor, t in inputs.items()}
                result = function(**feed)
                return {t.name: result[self.key_of[tensor]].numpy() for tensor, t in outputs.items()}

            return run_signature

        wrapped = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(self.graph_def, name=""), [])
        pruned = wrapped.prune(
            feeds=[wrapped.graph.get_tensor_by_name(tensor) for tensor in inputs],
            fetches=[wrapped.graph.get_tensor_by_name(tensor) for tensor in outputs],
        )

        def run_frozen(arrays: dict) -> dict:
            result = pruned(*[tf.constant(arrays[t.name]) for t in inputs.values()])
            return {t.name: value.numpy() for t, value in zip(outputs.values(), result, strict=True)}

        return run_frozen
