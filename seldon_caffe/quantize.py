"""`seldon-caffe quantize`: INT8 static quantization of an ONNX model (ONNX Runtime's quantizer),
with an accuracy report against the fp32 model.

Static quantization fixes every activation's int8 range from calibration inputs, so those
inputs must look like what the model will serve: a directory of `.npy` files (single-input
models: one array per file, with or without the batch axis) or `.npz` files (one entry per
input name). `--calibration random` uses N(0, 1) noise: fine for a smoke test, meaningless
for accuracy. The result is QDQ ONNX (QuantizeLinear / DequantizeLinear around each int8
op), which both the onnxruntime and the openvino runtime run at `precision: int8`; they look
for it as `<model>.int8.onnx` beside the model (runtimes/_onnx_source.py).

On a CPU without VNNI (AVX2 only, like this project's machines) int8 matrix products go
through VPMADDUBSW, whose 16-bit intermediate sums can saturate; weights are then quantized
to 7 bits (`reduce_range`), as ONNX Runtime recommends. Whether int8 is faster there at all
is measured, not assumed: see docs/benchmarks.md.

Python hook for other data (the vision example's images): pass any iterable of
{input name: preprocessed array} to `quantize_model` and `accuracy_report`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from . import cpu
from .errors import SeldonCaffeError
from .extras import require_modules
from .paths import check_output_path

Sample = dict[str, np.ndarray]
METHODS = ("minmax", "entropy", "percentile")
DEFAULT_SAMPLES = 64


def register(sub: argparse._SubParsersAction) -> None:
    """Add `quantize` to the `seldon-caffe` command."""
    q = sub.add_parser("quantize", help="INT8-quantize an ONNX model with calibration data (ONNX Runtime)")
    q.add_argument("model", type=Path, help="the fp32 ONNX model")
    q.add_argument("--calibration", required=True, help="a directory of .npy / .npz inputs, or 'random'")
    q.add_argument("-o", "--output", type=Path, required=True, help="where to write the INT8 model (MODEL.int8.onnx)")
    q.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="use at most this many calibration files")
    q.add_argument("--method", choices=METHODS, default="minmax", help="how activation ranges are chosen")
    q.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True, help="per-channel weights")
    q.add_argument("--check", type=Path, help="held-out inputs for the accuracy report (default: the calibration set)")
    q.set_defaults(handler=quantize_command)


def quantize_command(args: argparse.Namespace) -> int:
    check_output_path(args.output)
    require_modules("onnx", "onnxruntime")
    inputs = model_inputs(args.model)
    if args.calibration == "random":
        print("seldon-caffe: warning: random calibration data: the accuracy below means little", file=sys.stderr)
        samples = random_samples(inputs, min(args.samples, 16))
    else:
        samples = load_samples(Path(args.calibration), inputs, args.samples)
    check = load_samples(args.check, inputs, args.samples) if args.check else None
    report = quantize_model(
        args.model, args.output, samples, method=args.method, per_channel=args.per_channel, check=check
    )
    print(f"wrote {args.output} (int8, calibrated on {len(samples)} inputs); accuracy against fp32:")
    for output, stats in report.items():
        line = ", ".join(f"{key} {value:.4g}" for key, value in stats.items())
        print(f"  {output}: {line}")
    return 0


def model_inputs(path: Path) -> dict[str, tuple[int, ...]]:
    """{input name: shape} of an ONNX model, a symbolic or unknown dim as -1."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except (OSError, DecodeError) as exc:
        raise SeldonCaffeError(f"cannot read the ONNX model {path}: {exc}") from None
    constants = {init.name for init in graph.initializer}
    return {
        value.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
        for value in graph.input
        if value.name not in constants
    }


def load_samples(directory: Path, inputs: dict[str, tuple[int, ...]], limit: int = DEFAULT_SAMPLES) -> list[Sample]:
    """Calibration inputs from .npy (single-input models) or .npz (one array per input) files."""
    files = sorted(p for p in Path(directory).glob("*") if p.suffix in (".npy", ".npz"))[:limit]
    if not files:
        raise SeldonCaffeError(f"{directory}: no .npy or .npz files to calibrate with")
    return [read_sample(file, inputs) for file in files]


def read_sample(file: Path, inputs: dict[str, tuple[int, ...]]) -> Sample:
    """One input set from a .npy file (a single-input model's) or a .npz file (one array per
    input name), each array given its batch axis if it has none."""
    if file.suffix == ".npy":
        if len(inputs) != 1:
            raise SeldonCaffeError(f"{file}: the model has inputs {', '.join(inputs)}; use .npz files keyed by them")
        arrays = {next(iter(inputs)): np.load(file)}
    else:
        with np.load(file) as npz:
            arrays = {key: npz[key] for key in npz.files}
    missing = sorted(set(inputs) - set(arrays))
    if missing:
        raise SeldonCaffeError(f"{file}: no array for input {missing[0]!r}")
    return {name: _batched(arrays[name], shape, file) for name, shape in inputs.items()}


def _batched(array: np.ndarray, shape: tuple[int, ...], source: Path) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == len(shape) - 1:
        array = array[None]
    fits = array.ndim == len(shape) and all(want in (-1, got) for want, got in zip(shape, array.shape, strict=True))
    if not fits:
        raise SeldonCaffeError(f"{source}: shape {list(array.shape)} does not fit the input {list(shape)}")
    return array


def random_samples(inputs: dict[str, tuple[int, ...]], count: int, seed: int = 0) -> list[Sample]:
    """N(0, 1) inputs at batch 1: for smoke tests only."""
    rng = np.random.default_rng(seed)
    sizes = {name: tuple(1 if d == -1 else d for d in shape) for name, shape in inputs.items()}
    return [{name: rng.standard_normal(size).astype(np.float32) for name, size in sizes.items()} for _ in range(count)]


def quantize_model(
    model: Path,
    output: Path,
    samples: Sequence[Sample],
    *,
    method: str = "minmax",
    per_channel: bool = True,
    reduce_range: bool | None = None,
    check: Sequence[Sample] | None = None,
) -> dict[str, dict[str, float]]:
    """Write the QDQ INT8 model of `model` to `output`; return `accuracy_report` on `check`
    (default: the calibration samples). `reduce_range` None = 7-bit weights unless the CPU has VNNI."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if reduce_range is None:
        reduce_range = not cpu.has_vnni()
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}
    calibrate["percentile"] = CalibrationMethod.Percentile
    with tempfile.TemporaryDirectory(prefix="seldon-caffe-quantize-") as work:
        # Folds BatchNorm / Scale into the convolutions first, so int8 ranges fit the fused weights.
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        # ONNX Runtime pins a quantized Softmax's output range to [0, 1] in 1/255 steps, which
        # rounds 1000-class probabilities to 0; it gains no speed either, so it stays fp32.
        softmax = [
            n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node if n.op_type == "Softmax"
        ]
        quantize_static(
            str(prepared),
            str(output),
            _Reader(samples),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate[method],
            nodes_to_exclude=softmax,
        )
    return accuracy_report(model, output, check if check is not None else samples)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of samples."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        self._samples = iter(samples)

    def get_next(self) -> Sample | None:
        return next(self._samples, None)

    def rewind(self) -> None:  # called by some calibrators; one pass is all ours need
        pass


def accuracy_report(fp32: Path, int8: Path, samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
    """Per output, over `samples`: the int8 model against the fp32 one (accuracy.compare's
    measures: relative error, mean absolute error, top-1 agreement for class scores)."""
    import onnxruntime as ort

    from .accuracy import compare

    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (fp32, int8)]
    names = [o.name for o in sessions[0].get_outputs()]
    want, got = ([dict(zip(names, s.run(names, sample), strict=True)) for sample in samples] for s in sessions)
    return compare(want, got)
