"""`seldon-caffe convert tensorrt`: an ONNX model to a TensorRT plan (a serialized engine).

    seldon-caffe convert tensorrt MODEL.onnx -o MODEL.plan [--precision fp32|fp16|int8]
        [--calibration DIR] [--min-batch N] [--opt-batch N] [--max-batch N] [--workspace GiB]

Everything that can be decided without TensorRT is decided first, in plain Python (the
optimization profile, the int8 calibration batches, every check of the flags), so a wrong flag
fails in a second on any machine, and that logic is tested where TensorRT cannot be installed.
Only `build_plan` and its calibrator touch TensorRT. Written against TensorRT 10 (8.6 works);
TensorRT 11 removed the fp16/int8 builder flags and calibrators, and the command says what to
do there instead. docs/tensorrt.md has the rest.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..engines.tensorrt import require_tensorrt, trt_logger
from ..errors import SeldonCaffeError
from ..paths import check_output_path
from . import _Subparsers

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]  # (min, opt, max)
Sample = dict[str, np.ndarray]

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MAX_BATCH = 32
_FIX_DIMS = "python -m onnxruntime.tools.make_dynamic_shape_fixed --dim_param NAME --dim_value SIZE IN.onnx OUT.onnx"


def add_parser(formats: _Subparsers) -> None:
    trt = formats.add_parser(
        "tensorrt",
        help="ONNX -> TensorRT plan (fp32, fp16, int8; needs TensorRT and an NVIDIA GPU)",
        description="Build a TensorRT engine from an ONNX model and write it as a plan. "
        "The batch axis (a dynamic first dimension) gets an optimization profile from the batch flags.",
    )
    trt.add_argument("model", type=Path, help="the .onnx model")
    trt.add_argument("-o", "--output", type=Path, required=True, help="the .plan file to write")
    trt.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 (default), fp16, int8")
    trt.add_argument("--calibration", type=Path, metavar="DIR", help="int8: a directory of .npy / .npz inputs")
    trt.add_argument("--calibration-batch", type=_positive, metavar="N", help="int8: batch size (default: opt)")
    trt.add_argument(
        "--calibration-samples", type=_positive, default=512, metavar="N", help="int8: at most N files (512)"
    )
    trt.add_argument("--calibration-cache", type=Path, metavar="FILE", help="int8: default OUTPUT with .calib")
    trt.add_argument("--min-batch", type=_positive, metavar="N", help="smallest batch the engine takes (1)")
    trt.add_argument("--opt-batch", type=_positive, metavar="N", help="batch TensorRT tunes for (--max-batch)")
    trt.add_argument("--max-batch", type=_positive, metavar="N", help=f"largest batch ({DEFAULT_MAX_BATCH})")
    trt.add_argument("--workspace", type=_gib, metavar="GIB", help="builder scratch memory (default: TensorRT's)")
    trt.set_defaults(handler=convert_tensorrt_command)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def _gib(text: str) -> float:
    value = float(text) if text.replace(".", "", 1).isdigit() else 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of GiB, e.g. 4 or 0.5")
    return value


def convert_tensorrt_command(args: argparse.Namespace) -> int:
    request = prepare(args)  # every check that needs no TensorRT, first
    start = time.perf_counter()
    plan = build_plan(request)
    args.output.write_bytes(plan)
    trt = require_tensorrt()
    batch = f", batch {request.batches}" if request.batches else ""
    c = request.calibration
    calibrated = f", calibration {len(c.batches)} batches of {c.batch_size} (cache {c.cache})" if c else ""
    print(
        f"wrote {args.output}: TensorRT {trt.__version__} plan for {_gpu_name()}, {request.precision}{batch}, "
        f"inputs {describe_shapes(request.inputs)}{calibrated}, {len(plan) / 2**20:.1f} MiB "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


# -- what can be decided without TensorRT ----------------------------------------------


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes an engine takes: min..max, tuned for opt."""

    min: int
    opt: int
    max: int

    def __str__(self) -> str:
        return f"{self.min}..{self.max} (opt {self.opt})"


@dataclass
class Calibration:
    """INT8 calibration input: whole batches in file order, and where TensorRT's cache lives."""

    batches: list[Sample]
    batch_size: int
    cache: Path


@dataclass
class BuildRequest:
    """A checked `convert tensorrt` command: all `build_plan` needs."""

    onnx: Path
    precision: str
    inputs: dict[str, Shape]
    profiles: dict[str, Profile]
    batches: BatchRange | None
    quantized: bool = False  # the ONNX model carries its own int8 scales (QDQ)
    calibration: Calibration | None = None
    workspace: int | None = None  # bytes


def prepare(args: argparse.Namespace) -> BuildRequest:
    """Check the command and load what the build needs; SeldonCaffeError says what is wrong."""
    from ..extras import require_modules
    from ..quantize import load_samples, model_inputs

    require_modules("onnx")
    inputs = model_inputs(args.model)
    quantized = args.precision == "int8" and is_quantized(args.model)
    _check_precision_flags(args, quantized)
    profiles = optimization_profiles(inputs, args.min_batch, args.opt_batch, args.max_batch)
    batches = resolve_batches(inputs, args.min_batch, args.opt_batch, args.max_batch)
    check_output_path(args.output)
    calibration = None
    if args.calibration is not None and not quantized:
        size = calibration_batch_size(inputs, batches, args.calibration_batch)
        grouped, dropped = calibration_batches(load_samples(args.calibration, inputs, args.calibration_samples), size)
        if dropped:
            _note(f"{dropped} calibration item(s) after the last full batch of {size} are not used")
        calibration = Calibration(grouped, size, args.calibration_cache or args.output.with_suffix(".calib"))
        if calibration.cache.is_file():
            _note(f"reusing the calibration cache {calibration.cache} (delete it to calibrate again)")
    workspace = int(args.workspace * 2**30) if args.workspace else None
    return BuildRequest(args.model, args.precision, inputs, profiles, batches, quantized, calibration, workspace)


def _check_precision_flags(args: argparse.Namespace, quantized: bool) -> None:
    if args.precision == "int8" and args.calibration is None and not quantized:
        raise SeldonCaffeError(
            "--precision int8 needs --calibration DIR: a directory of .npy (one input) or .npz (one array per "
            "input name) files like the inputs you serve (docs/tensorrt.md); or quantize the ONNX model first "
            "with seldon-caffe quantize"
        )
    if args.precision == "int8" and args.calibration is not None and quantized:
        _note("the model is already quantized (QDQ): TensorRT uses its scales, not --calibration")
    if args.precision != "int8":
        flags = ("--calibration", "--calibration-batch", "--calibration-cache")
        for flag in flags:
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                raise SeldonCaffeError(f"{flag} is for --precision int8 (this build is {args.precision})")
    elif args.calibration is None and (args.calibration_batch or args.calibration_cache):
        raise SeldonCaffeError("--calibration-batch and --calibration-cache need --calibration DIR")


def _note(message: str) -> None:
    print(f"seldon-caffe: note: {message}", file=sys.stderr)


def is_quantized(path: Path) -> bool:
    """Whether the ONNX model holds QuantizeLinear/DequantizeLinear nodes (explicit int8)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node)


def resolve_batches(
    inputs: Mapping[str, Shape], min_batch: int | None, opt_batch: int | None, max_batch: int | None
) -> BatchRange | None:
    """The engine's batch range from the flags (None: not given). Defaults: min 1, max 32 (or
    the largest given), opt = max: TensorRT tunes kernels for opt, and full batches are what
    cost GPU time. A model with a fixed batch keeps it (None when its inputs disagree)."""
    flags = {"--min-batch": min_batch, "--opt-batch": opt_batch, "--max-batch": max_batch}
    given = {flag: value for flag, value in flags.items() if value is not None}
    if not any(shape and shape[0] == -1 for shape in inputs.values()):
        return _fixed_batch(inputs, given)
    high = max_batch if max_batch is not None else max(DEFAULT_MAX_BATCH, opt_batch or 1, min_batch or 1)
    batches = BatchRange(min_batch or 1, opt_batch or high, high)
    if not 1 <= batches.min <= batches.opt <= batches.max:
        raise SeldonCaffeError(
            f"batch sizes must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch; "
            f"got {batches.min} <= {batches.opt} <= {batches.max}"
        )
    return batches


def _fixed_batch(inputs: Mapping[str, Shape], given: Mapping[str, int]) -> BatchRange | None:
    firsts = {shape[0] for shape in inputs.values() if shape}
    batch = firsts.pop() if len(firsts) == 1 else None
    for flag, value in given.items():
        if value != batch:
            raise SeldonCaffeError(
                f"the model has no dynamic batch axis ({describe_shapes(inputs)}): {flag} {value} cannot change "
                f"that; drop the batch flags, or export the ONNX with a dynamic first dimension "
                f"(seldon-caffe convert caffe --batch dynamic)"
            )
    return BatchRange(batch, batch, batch) if batch is not None else None


def optimization_profiles(
    inputs: Mapping[str, Shape],
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
) -> dict[str, Profile]:
    """{input: (min, opt, max) shape}. The batch axis is a dynamic first dimension; any other
    dynamic dimension is an error, since TensorRT needs its range and only the user knows it."""
    for name, shape in inputs.items():
        dynamic = [axis for axis, size in enumerate(shape) if size < 0 and axis > 0]
        if dynamic:
            raise SeldonCaffeError(
                f"input {name!r} {_dims(shape)} has a dynamic dimension {dynamic[0]} besides the batch axis; "
                f"TensorRT needs its size: fix it in the ONNX model first, e.g. {_FIX_DIMS}"
            )
    batches = resolve_batches(inputs, min_batch, opt_batch, max_batch)
    profiles: dict[str, Profile] = {}
    for name, shape in inputs.items():
        if shape and shape[0] == -1 and batches is not None:
            rest = shape[1:]
            profiles[name] = ((batches.min, *rest), (batches.opt, *rest), (batches.max, *rest))
        else:
            profiles[name] = (shape, shape, shape)
    return profiles


def calibration_batch_size(inputs: Mapping[str, Shape], batches: BatchRange | None, requested: int | None) -> int:
    """Items per calibration batch: --calibration-batch, else the profile's opt batch. All
    inputs are cut into batches together, so each needs that batch axis."""
    size = requested if requested is not None else batches.opt if batches else 0
    if batches is not None and not batches.min <= size <= batches.max:
        raise SeldonCaffeError(f"--calibration-batch {size} is outside the engine's batch range {batches}")
    unbatched = [name for name, shape in inputs.items() if batches is None or not shape or shape[0] not in (-1, size)]
    if unbatched:
        raise SeldonCaffeError(
            f"int8 calibration needs a batch axis shared by every input; input {unbatched[0]!r} has none "
            f"({describe_shapes(inputs)})"
        )
    return size


def calibration_batches(samples: Sequence[Sample], batch_size: int) -> tuple[list[Sample], int]:
    """Regroup samples (`quantize.load_samples`: one file each, 1+ items on axis 0) into batches
    of exactly `batch_size` items, in file order. TensorRT calibrates at one fixed shape, so a
    last partial batch is dropped rather than padded with repeats that would skew the ranges.
    Returns (batches, items dropped)."""
    for index, sample in enumerate(samples, 1):
        counts = {name: len(array) for name, array in sample.items()}
        if len(set(counts.values())) > 1:
            held = ", ".join(f"{name}: {count}" for name, count in counts.items())
            raise SeldonCaffeError(
                f"calibration file {index} (in name order) holds different numbers of items per input ({held}); "
                f"every input of a file needs the same batch"
            )
    names = list(samples[0]) if samples else []
    joined = {name: np.concatenate([sample[name] for sample in samples]) for name in names}
    total = len(joined[names[0]]) if names else 0
    count = total // batch_size
    if count == 0:
        raise SeldonCaffeError(
            f"{total} calibration items make no full batch of {batch_size}: add inputs, or lower --calibration-batch"
        )
    batches = [
        {name: array[i * batch_size : (i + 1) * batch_size] for name, array in joined.items()} for i in range(count)
    ]
    return batches, total - count * batch_size


def describe_shapes(inputs: Mapping[str, Shape]) -> str:
    return ", ".join(f"{name}{_dims(shape)}" for name, shape in inputs.items())


def _dims(shape: Sequence[int]) -> str:
    dims = [str(size) if size >= 0 else "N" if axis == 0 else "?" for axis, size in enumerate(shape)]
    return "[" + ", ".join(dims) + "]"


# -- TensorRT ----------------------------------------------------------------------------


def build_plan(request: BuildRequest) -> bytes:
    """Parse the ONNX model, add the profile and precision, build and serialize the engine."""
    trt = require_tensorrt()
    builder = trt.Builder(trt_logger())
    major = int(trt.__version__.split(".")[0])
    # TensorRT 10 networks are always explicit-batch; 8.6 needs the flag.
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse_from_file(str(request.onnx)):
        errors = "; ".join(str(parser.get_error(i)).strip() for i in range(parser.num_errors))
        raise SeldonCaffeError(f"TensorRT cannot parse {request.onnx}: {errors or 'no reason given'}")
    config = builder.create_builder_config()
    if request.workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request.workspace)
    _add_profiles(builder, config, network, request)
    calibrator = _set_precision(trt, config, network, request)
    serialized = builder.build_serialized_network(network, config)
    del calibrator  # alive until here: TensorRT holds only a pointer to it
    if serialized is None:
        raise SeldonCaffeError(f"TensorRT could not build an engine from {request.onnx} (its log above says why)")
    return bytes(serialized)


def _add_profiles(builder: Any, config: Any, network: Any, request: BuildRequest) -> None:
    """One optimization profile for the dynamic inputs; for int8, a calibration profile fixed
    at the calibration batch (TensorRT calibrates at one shape)."""
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t.name for t in tensors if any(size < 0 for size in tuple(t.shape))]
    if not dynamic:
        return
    profile = builder.create_optimization_profile()
    for name in dynamic:
        profile.set_shape(name, *request.profiles[name])
    config.add_optimization_profile(profile)
    if request.calibration is not None:
        fixed = builder.create_optimization_profile()
        for name in dynamic:
            shape = (request.calibration.batch_size, *request.profiles[name][0][1:])
            fixed.set_shape(name, shape, shape, shape)
        config.set_calibration_profile(fixed)


def _set_precision(trt: ModuleType, config: Any, network: Any, request: BuildRequest) -> Any:
    """Builder flags for fp16 / int8, and the int8 calibrator (returned: it must stay alive)."""
    if request.precision == "fp32":
        return None
    flag = {"fp16": "FP16", "int8": "INT8"}[request.precision]
    if not hasattr(trt.BuilderFlag, flag):
        if request.quantized:
            return None  # TensorRT 11: a strongly typed QDQ network is int8 by itself
        raise SeldonCaffeError(
            f"TensorRT {trt.__version__} has no {flag} builder flag (TensorRT 11 removed them): build fp32, give it "
            f"an ONNX model already in the precision you want (QDQ int8: seldon-caffe quantize), or use TensorRT 10"
        )
    config.set_flag(getattr(trt.BuilderFlag, flag))
    if request.calibration is None:
        return None
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    dtypes = {tensor.name: np.dtype(trt.nptype(tensor.dtype)) for tensor in tensors}
    calibrator = entropy_calibrator(trt, request.calibration, dtypes)
    config.int8_calibrator = calibrator
    return calibrator


def entropy_calibrator(trt: Any, calibration: Calibration, dtypes: Mapping[str, np.dtype]) -> Any:
    """A trt.IInt8EntropyCalibrator2 feeding `calibration`'s batches, made here because the base
    class exists only where TensorRT imports. TensorRT's Python API takes device pointers and
    allocates nothing, so the batches go to the GPU as torch CUDA tensors: torch is the CUDA
    library this project already depends on (no pycuda / cuda-python needed)."""
    try:
        import torch
    except ImportError:
        raise SeldonCaffeError("int8 calibration copies batches to the GPU with torch: pip install torch") from None

    # `trt` is Any, not ModuleType: tensorrt has no stubs, and a base class must be a type to mypy.
    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self._pending = iter(calibration.batches)
            self._device: dict[str, torch.Tensor] = {}  # the current batch: alive until the next call

        def get_batch_size(self) -> int:
            return calibration.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._pending, None)
            if batch is None:
                return None  # no more data: calibration ends
            for name in names:
                host = np.ascontiguousarray(batch[name], dtype=dtypes.get(name, np.float32))
                self._device[name] = torch.from_numpy(host).to("cuda")
            torch.cuda.synchronize()
            return [self._device[name].data_ptr() for name in names]

        def read_calibration_cache(self) -> bytes | None:
            return calibration.cache.read_bytes() if calibration.cache.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            calibration.cache.write_bytes(bytes(cache))

    return EntropyCalibrator()


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name()
    except Exception:  # no torch, or it cannot see the GPU TensorRT used: just leave the name out
        return "this GPU"
