"""The `tensorflow` runtime: a SavedModel's signature, served by stock TensorFlow tuned for CPU.

dl_inference served TensorFlow on CPU through Intel's MKL build of TF Serving. Stock
TensorFlow (2.9 and later) carries the same oneDNN kernels, so this runtime is TensorFlow
itself, tuned the same way: oneDNN on, thread pools sized to the pod, and the Intel OpenMP
environment variables set before TensorFlow loads. docs/tensorflow.md says what each knob
does and what to pick; docs/benchmarks.md has the measurements behind it.

Import-time settings are the crux. TensorFlow reads `TF_ENABLE_ONEDNN_OPTS` once, while
`import tensorflow` runs (it decides which kernels get registered), and an OpenMP runtime
reads `OMP_*` / `KMP_*` once, when it is loaded. Setting them afterwards silently does
nothing. So this module never imports TensorFlow at the top: `TensorFlowRuntime.__init__`
validates the options, writes the environment, and only then imports TensorFlow; if
TensorFlow is already in the process with another oneDNN setting it stops with an error
rather than serve with a setting the model.yaml did not ask for.

Names: inputs and outputs are the signature's keys, unless dl_inference's config.txt sits
beside model.yaml. Then, as in every runtime, they are config.txt's `name`s (matched to the
signature by `node_name`), so a model answers with the same names here as its ONNX conversion
does under onnxruntime, and hooks keyed on names survive a change of runtime.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..engines.description import FILE_NAME as DESCRIPTION_FILE
from ..engines.description import (
    ModelDescription,
    SignatureEntry,
    TensorDescription,
    find_signature_entry,
    load_description,
    unknown_node_name,
)
from ..engines.tensorflow import signature_def_tensors
from ..errors import BadRequest, ConfigError, ModelLoadError, first_line
from .base import Arrays, Runtime, TensorSpec
from .builtin import ONEDNN_ENV, TensorFlowOptions
from .options import cuda_index

logger = logging.getLogger(__name__)

# The process in which this module started TensorFlow's runtime (its thread pools). A process
# forked after that inherits TensorFlow's state but none of its threads, and its first run
# waits forever for them; seen with Seldon's gunicorn and gRPC workers when a model was
# loaded in their parent. Module state survives fork, so a child can tell.
_started_in: int | None = None


def _onednn_state(asked: bool | str) -> str:
    enabled = onednn_enabled()
    state = "unknown" if enabled is None else "on" if enabled else "off"
    return f"{state} (auto)" if asked == "auto" else state


def import_tensorflow(options: TensorFlowOptions) -> Any:
    """Write the import-time environment, import TensorFlow, and check the setting took.

    TensorFlow decides once, inside `import tensorflow`, whether its oneDNN kernels are on;
    the environment variable is never read again. If some earlier code (another model, a
    converter, a library) already imported TensorFlow with the other setting, serving would
    quietly use it, so that is a ModelLoadError saying what to change.
    """
    already = "tensorflow" in sys.modules
    env = options.environment()
    if already:
        late = sorted(key for key in env if key != ONEDNN_ENV and os.environ.get(key) != env[key])
        if late:
            logger.warning("TensorFlow was imported before the tensorflow runtime: %s may not apply", ", ".join(late))
    os.environ.update(env)
    import tensorflow as tf

    enabled = onednn_enabled()
    if enabled is not None and options.onednn != "auto" and enabled != options.onednn:
        want, have = ("on", "off") if options.onednn else ("off", "on")
        raise ModelLoadError(
            f"options.onednn asks for oneDNN {want}, but TensorFlow was already imported in this process with "
            f"oneDNN {have}: {ONEDNN_ENV} is read only when TensorFlow is first imported. Load this model "
            f"before anything else imports tensorflow (another model, a converter, a library), or set "
            f"options.onednn: {str(enabled).lower()} (or auto)"
        )
    return tf


def onednn_enabled() -> bool | None:
    """Whether this process's TensorFlow registered its oneDNN kernels (None: cannot tell).

    TensorFlow has no public call for it; the private one it uses in its own tests is the
    only way to see what `import tensorflow` actually decided.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def _configure_threads(tf: Any, options: TensorFlowOptions) -> None:
    """Size TensorFlow's process-wide thread pools; they freeze when its runtime starts."""
    threading = tf.config.threading
    current = (threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads())
    if current == (options.intra_op, options.inter_op):
        return
    try:
        threading.set_intra_op_parallelism_threads(options.intra_op)
        threading.set_inter_op_parallelism_threads(options.inter_op)
    except RuntimeError:
        raise ModelLoadError(
            f"options intra_op={options.intra_op}, inter_op={options.inter_op}: TensorFlow's thread pools are "
            f"already running in this process with intra_op={current[0]}, inter_op={current[1]} (0 = one per "
            "core). They are per process: serve one TensorFlow model per process, or give every model the same "
            "settings"
        ) from None


class TensorFlowRuntime(Runtime):
    """One signature of a SavedModel. `native` is the loaded SavedModel object."""

    name = "tensorflow"

    def __init__(self, config: ModelConfig):
        global _started_in
        self.options = TensorFlowOptions.from_config(config)
        if _started_in is not None and _started_in != os.getpid():
            raise ModelLoadError(
                f"TensorFlow was started in process {_started_in}, and this process ({os.getpid()}) was forked "
                "from it: TensorFlow's thread pools do not survive fork(), so every request would hang. Load "
                "TensorFlow models only after the fork (with Seldon: in load(), not in the parent process)"
            )
        tf = import_tensorflow(self.options)
        self._tf = tf
        self._device = _device_name(tf, self.options.device)
        _configure_threads(tf, self.options)
        path = config.files["saved_model"]
        try:
            self.native = tf.saved_model.load(str(path), tags=list(self.options.tags) if self.options.tags else None)
        except Exception as exc:  # TF raises OSError, ValueError, RuntimeError... for a bad directory
            why = first_line(exc) or type(exc).__name__
            raise ModelLoadError(f"{path}: not a loadable SavedModel: {why}") from None
        finally:
            _started_in = _started_in or os.getpid()  # loading (even failing) starts the runtime
        signatures = dict(self.native.signatures)
        if self.options.signature not in signatures:
            have = ", ".join(signatures) or "none (export the model with a serving signature)"
            raise ConfigError(
                f"{config.source}: field 'options.signature': {path} has no signature "
                f"{self.options.signature!r}; it has {have}"
            )
        self.function = signatures[self.options.signature]
        _, kwargs = self.function.structured_input_signature
        input_specs, output_specs = dict(sorted(kwargs.items())), dict(self.function.structured_outputs)
        # {served name: signature key}: config.txt's names where there is one, else the keys.
        self._input_keys, self._output_keys = self._served_names(config, list(input_specs), list(output_specs))
        self.inputs = [_spec(name, input_specs[key], config.inputs, True) for name, key in self._input_keys.items()]
        self.outputs = [
            _spec(name, output_specs[key], config.outputs, False) for name, key in self._output_keys.items()
        ]
        self._string_inputs = {s.name for s in self.inputs if s.dtype == "object"}
        # The signature lists its variables in the order the graph uses them; a Keras export
        # also keeps the model's own order (kernel, bias; gamma, beta, mean, variance), which
        # is what Keras' get_weights returns, so that order wins where it exists.
        order = {v.name: i for i, v in enumerate(getattr(self.native, "variables", None) or ())}
        self._variables = sorted(self.function.variables, key=lambda v: order.get(v.name, len(order)))
        logger.info(
            "tensorflow %s: signature %s, oneDNN %s, intra_op=%d, inter_op=%d, device %s; %s",
            tf.__version__,
            self.options.signature,
            _onednn_state(self.options.onednn),
            self.options.intra_op,
            self.options.inter_op,
            self._device,
            self.signature(),
        )

    def _served_names(
        self, config: ModelConfig, input_keys: list[str], output_keys: list[str]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """{served name: signature key} for the inputs and the outputs.

        With a config.txt beside model.yaml the served names are its `name`s and the outputs
        are the ones it lists, exactly what `convert tensorflow` puts in the ONNX model. A
        signature input it leaves out must still be fed, so that one keeps its key."""
        path = config.model_dir / DESCRIPTION_FILE
        if not path.is_file():
            return {key: key for key in input_keys}, {key: key for key in output_keys}
        description = load_description(path)
        saved_model = config.files["saved_model"]
        printed_inputs, printed_outputs = signature_def_tensors(saved_model, self.options.signature, self.options.tags)
        where = f"signature {self.options.signature!r} of {saved_model}"
        inputs = _described_keys(description, description.inputs, input_keys, printed_inputs, where)
        inputs.update({key: key for key in input_keys if key not in inputs.values()})
        outputs = _described_keys(description, description.outputs, output_keys, printed_outputs, where)
        logger.info("%s: serving inputs and outputs by its names", path)
        return inputs, outputs

    def check_inputs(self, inputs: np.ndarray | Mapping[str, Any]) -> Arrays:
        # JSON strings arrive as numpy unicode arrays; a tf.string input wants them as objects.
        if self._string_inputs:
            if not isinstance(inputs, Mapping) and len(self.inputs) == 1:
                inputs = {self.inputs[0].name: inputs}
            if isinstance(inputs, Mapping):
                inputs = {k: _as_strings(v) if k in self._string_inputs else v for k, v in inputs.items()}
        return super().check_inputs(inputs)

    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        # A signature function may be called from many threads at once: TensorFlow runs
        # each call as its own graph execution, and the GIL is released while it does.
        tf = self._tf
        try:
            with tf.device(self._device):
                result = self.function(**{self._input_keys[name]: tf.constant(value) for name, value in feed.items()})
        except tf.errors.InvalidArgumentError as exc:  # e.g. a reshape the input cannot take
            why = first_line(exc) or type(exc).__name__
            raise BadRequest(f"the model rejected the input: {why}; expected {self.signature()}") from None
        return {name: result[self._output_keys[name]].numpy() for name in outputs}

    # -- weights: the SavedModel's variables, grouped by Keras layer name ------------------

    def get_weights(self, layer: str) -> list[np.ndarray]:
        """The arrays of `layer`: a Keras layer's kernel and bias, in the order Keras lists them."""
        return [variable.numpy() for variable in self._layer_variables(layer)]

    def set_weights(self, layer: str, arrays: Sequence[np.ndarray]) -> None:
        """Assign new values to `layer`'s variables; later runs use them.

        A run already in flight on another thread may see some of the new arrays and not
        others: a hook that needs one set of weights per request must serialise itself.
        """
        variables = self._layer_variables(layer)
        expected = ", ".join(f"{list(v.shape)} {v.dtype.name}" for v in variables)
        if len(arrays) != len(variables):
            raise BadRequest(f"layer {layer!r} has {len(variables)} arrays ({expected}); got {len(arrays)}")
        values = []
        for variable, array in zip(variables, arrays, strict=True):
            value = np.asarray(array)
            if tuple(value.shape) != tuple(variable.shape):
                raise BadRequest(f"layer {layer!r}: got an array of shape {list(value.shape)}; expected {expected}")
            values.append(value.astype(variable.dtype.as_numpy_dtype))
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)

    def _layer_variables(self, layer: str) -> list[Any]:
        variables = [v for v in self._variables if _layer_of(v.name) == layer]
        if not variables:
            layers = sorted({_layer_of(v.name) for v in self._variables})
            shown = ", ".join(layers[:20]) + (" ..." if len(layers) > 20 else "")
            raise BadRequest(f"no layer {layer!r} with weights in this SavedModel; layers: {shown or 'none'}")
        return variables

    def close(self) -> None:
        self.function = None
        self.native = None
        self._variables = []


def _described_keys(
    description: ModelDescription,
    described: tuple[TensorDescription, ...],
    keys: list[str],
    printed: Mapping[str, str],
    where: str,
) -> dict[str, str]:
    """{config.txt name: signature key} for each of `described` (config.txt's inputs or outputs)."""
    kind = "input" if described is description.inputs else "output"
    entries = [SignatureEntry(key, (printed[key],) if key in printed else ()) for key in keys]
    found = {}
    for tensor in described:
        entry = find_signature_entry(tensor.node_name, entries)
        if entry is None:
            error = unknown_node_name(description, kind, tensor, where, entries)
            # `convert tensorflow` can cut the graph at an inner tensor; a signature cannot.
            raise type(error)(f"{error}; the tensorflow runtime serves the signature's own {kind}s only")
        found[tensor.name] = entry.key
    return found


def _layer_of(variable_name: str) -> str:
    # "dense_1/kernel:0" -> "dense_1"; "model/block1/conv/kernel:0" -> "model/block1/conv"
    return variable_name.rsplit(":", 1)[0].rpartition("/")[0]


def _spec(name: str, tf_spec: Any, overrides: list[dict[str, Any]] | None, is_input: bool) -> TensorSpec:
    dtype = np.dtype(tf_spec.dtype.as_numpy_dtype).name
    if tf_spec.shape.rank is not None:
        return TensorSpec(name, dtype, tuple(-1 if d is None else int(d) for d in tf_spec.shape.as_list()))
    # An unknown rank cannot be checked; model.yaml's inputs/outputs can give the shape.
    given = next((o.get("shape") for o in overrides or () if o.get("name") == name), None)
    if given is not None:
        return TensorSpec(name, dtype, tuple(given))
    hint = f"give its shape in model.yaml ({'inputs' if is_input else 'outputs'}: [{{name: {name}, shape: [-1, ...]}}])"
    if is_input:  # requests could not be checked against it
        raise ModelLoadError(f"signature input {name!r} has no known rank; {hint}")
    logger.warning("signature output %r has no known rank; its metadata says shape []: %s", name, hint)
    return TensorSpec(name, dtype, ())


def _device_name(tf: Any, device: str) -> str:
    if device == "cpu":
        return "/CPU:0"
    index = cuda_index(device) or 0
    gpus = tf.config.list_physical_devices("GPU")
    if index >= len(gpus):
        raise ModelLoadError(
            f"options.device {device!r}: this TensorFlow sees {len(gpus)} GPU(s) "
            "(tensorflow-cpu has none; install tensorflow[and-cuda] for GPUs)"
        )
    return f"/GPU:{index}"


def _as_strings(value: Any) -> Any:
    array = np.asarray(value)
    return array.astype(object) if array.dtype.kind in "US" else array
