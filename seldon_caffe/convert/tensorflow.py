"""`seldon-caffe convert tensorflow`: a SavedModel plus config.txt to ONNX, through tf2onnx.

tf2onnx is the converter the ONNX project keeps for TensorFlow, so we drive it rather than
write our own. What we add is dl_inference's contract: config.txt says which tensors go in
and out and what to call them, and the result is checked against TensorFlow itself.

A config.txt `node_name` may be any of the names a user meets for a tensor (the matching is
`find_signature_entry`'s, which the tensorflow runtime shares): the signature's key (`image`,
`output_0`, with or without `:0`), the graph tensor `saved_model_cli show` prints for it
(`serving_default_image:0`, `StatefulPartitionedCall_1:0`), the frozen graph's (`image:0`,
`Identity:0`), or, for an output, any tensor inside the frozen graph
(`StatefulPartitionedCall/functional/probs/Softmax:0`), which cuts the model there, as
dl_inference's frozen-graph converter did. The ONNX model's inputs and outputs take
config.txt's `name`s and `dims` (-1 stays dynamic).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..engines.description import (
    ModelDescription,
    SignatureEntry,
    TensorDescription,
    find_signature_entry,
    load_description,
    unknown_node_name,
)
from ..errors import SeldonCaffeError
from . import _Subparsers, add_tolerance, opset_type
from .check import DEFAULT_TOLERANCE, OutputError, check_conversion, check_signature, format_errors

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
    from ..paths import check_output_path

    check_output_path(args.output)
    description = load_description(args.config)
    started = time.perf_counter()
    with stderr_kept_unless_failed():
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


@contextlib.contextmanager
def stderr_kept_unless_failed() -> Iterator[None]:
    """Hold back what TensorFlow and tf2onnx write to stderr while converting, and show it only
    if the conversion fails unexpectedly. TensorFlow's native code logs through absl before
    absl is set up, which TF_CPP_MIN_LOG_LEVEL does not reach (grappler's "Starting new
    session", GPU counts), and its Python side warns about APIs tf2onnx uses: a dozen lines
    per conversion, none the user can act on. The file descriptor itself is redirected, as
    that native output never passes through Python."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except SeldonCaffeError:
            raise  # our own one-line message says what is wrong
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


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
    from ..extras import require_modules

    require_modules("tensorflow", "tf2onnx", "onnx", "onnxruntime")
    from tf2onnx import convert

    graph = _FrozenSignature(saved_model, signature, tag, description)
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

    def __init__(self, saved_model: Path, signature: str, tag: str, description: ModelDescription):
        from tf2onnx import tf_loader

        from ..engines.tensorflow import signature_def_tensors

        self.saved_model, self.signature, self.tags = saved_model, signature, tag.split(",")
        self.description = description
        try:
            loaded = tf_loader.from_saved_model(
                str(saved_model), None, None, tag, [signature], return_tensors_to_rename=True
            )
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise SeldonCaffeError(f"{saved_model}: cannot load signature {signature!r} (tag {tag!r}): {exc}") from None
        self.graph_def, self.inputs, self.outputs, renames = loaded
        self.key_of = dict(renames)  # frozen graph tensor -> signature key
        printed_inputs, printed_outputs = signature_def_tensors(saved_model, signature, self.tags)
        self.input_entries = self._entries(self.inputs, printed_inputs)
        self.output_entries = self._entries(self.outputs, printed_outputs)
        self.nodes = {node.name for node in self.graph_def.node}

    def _entries(self, frozen: list[str], printed: dict[str, str]) -> dict[SignatureEntry, str]:
        """Each signature entry, with the names saved_model_cli and the frozen graph give it -> its frozen tensor."""
        entries = {}
        for tensor in frozen:
            key = self.key_of.get(tensor, tensor)
            names = (printed[key], tensor) if key in printed else (tensor,)
            entries[SignatureEntry(key, names)] = tensor
        return entries

    def input_tensor(self, tensor: TensorDescription) -> str:
        entry = find_signature_entry(tensor.node_name, list(self.input_entries))
        if entry is None:
            raise self._unknown("input", tensor, self.input_entries)
        return self.input_entries[entry]

    def output_tensor(self, tensor: TensorDescription) -> str:
        entry = find_signature_entry(tensor.node_name, list(self.output_entries))
        if entry is not None:
            return self.output_entries[entry]
        # A tensor inside the graph: the conversion stops there.
        name = tensor.node_name if ":" in tensor.node_name else f"{tensor.node_name}:0"
        if name.rpartition(":")[0] not in self.nodes:
            raise self._unknown("output", tensor, self.output_entries)
        return name

    def _unknown(self, kind: str, tensor: TensorDescription, entries: dict[SignatureEntry, str]) -> SeldonCaffeError:
        where = f"signature {self.signature!r} of {self.saved_model}"
        return unknown_node_name(self.description, kind, tensor, where, list(entries))

    def reference(self, inputs: dict[str, TensorDescription], outputs: dict[str, TensorDescription]):
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
