"""`seldon-caffe convert triton`: a model plus config.txt to a Triton model repository.

    REPO/NAME/config.pbtxt
    REPO/NAME/VERSION/model.onnx     (or model.plan)

MODEL may be an ONNX file, a TensorRT plan, a TensorFlow SavedModel or a PyTorch file; the
last two are converted to ONNX first, by the same code as `convert tensorflow` / `convert
torch` (and checked against their framework the same way). config.pbtxt comes from
config.txt: `batch_size` is Triton's max_batch_size (the batch axis then leaves `dims`),
with dynamic batching on; an ONNX model on GPU gets ONNX Runtime's TensorRT accelerator at
the asked precision, which is how Triton runs ONNX at fp16 without a separate plan.

The repository is the user's: an existing version directory or a different config.pbtxt
is never replaced without --force, and a conversion that fails leaves nothing behind.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..engines.description import ModelDescription, TensorDescription, load_description
from ..errors import SeldonCaffeError
from ..paths import check_output_dir
from . import _Subparsers, add_tolerance, opset_type
from .check import check_signature, format_errors
from .torch import add_class_option

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}
PLAN_SUFFIXES = (".plan", ".engine", ".trt")
PRECISIONS = ("fp32", "fp16")
DEFAULT_QUEUE_DELAY_US = 100
WORKSPACE_BYTES = 1 << 30


class Enum(str):
    """A protobuf enum value: written bare in text format (TYPE_FP32), where strings are quoted."""


def add_parser(formats: _Subparsers) -> None:
    parser = formats.add_parser(
        "triton",
        help="model + config.txt -> a Triton model repository (config.pbtxt + model.onnx / model.plan)",
        description="Write a Triton model repository entry for an ONNX model, a TensorRT plan, a SavedModel "
        "or a PyTorch file (converted to ONNX first), described by config.txt (docs/convert.md).",
    )
    parser.add_argument("model", type=Path, help=".onnx, .plan, a SavedModel directory, or a PyTorch file")
    parser.add_argument("--config", type=Path, required=True, help="config.txt: the model description")
    parser.add_argument("--name", required=True, help="the model's name in the repository")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the model repository directory")
    parser.add_argument("--version", type=int, default=1, help="the version directory to write (default 1)")
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="ONNX on GPU: the TensorRT accelerator's precision (default fp32)"
    )
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="where Triton runs the instances")
    parser.add_argument("--instances", type=int, default=1, help="model instances (per GPU for gpu)")
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=DEFAULT_QUEUE_DELAY_US,
        help=f"dynamic batching: how long a request may wait for others (default {DEFAULT_QUEUE_DELAY_US})",
    )
    add_class_option(parser)
    parser.add_argument("--opset", type=opset_type, help="ONNX opset for a SavedModel or PyTorch source")
    parser.add_argument("--force", action="store_true", help="replace an existing version / config.pbtxt")
    add_tolerance(parser)
    parser.set_defaults(handler=convert_triton_command)


def convert_triton_command(args: argparse.Namespace) -> int:
    check_output_dir(args.output)
    description = load_description(args.config)
    if args.instances < 1 or args.version < 1 or args.max_queue_delay_us < 0:
        raise SeldonCaffeError("--instances and --version must be at least 1, --max-queue-delay-us at least 0")
    kind = model_kind(args.model)
    if kind == "plan" and args.precision:
        raise SeldonCaffeError(
            "--precision: a TensorRT plan's precision was fixed when it was built (convert tensorrt)"
        )
    if kind == "plan" and args.device == "cpu":
        raise SeldonCaffeError("--device cpu: TensorRT plans run on NVIDIA GPUs only")
    platform, file_name = PLATFORMS["plan" if kind == "plan" else "onnx"]
    config = model_config(
        args.name,
        description,
        platform=platform,
        precision=args.precision or "fp32",
        device=args.device,
        instances=args.instances,
        max_queue_delay_us=args.max_queue_delay_us,
    )
    model_dir = write_repository(args, kind, description, config, file_name)
    print(f"wrote {model_dir}: config.pbtxt and {args.version}/{file_name}")
    return 0


def model_kind(path: Path) -> str:
    """'onnx', 'plan', 'tensorflow' or 'torch', from what `path` is."""
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "tensorflow"
        raise SeldonCaffeError(f"{path}: a directory, but not a SavedModel (no saved_model.pb)")
    if not path.is_file():
        raise SeldonCaffeError(f"{path}: no such file or directory")
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix in PLAN_SUFFIXES:
        return "plan"
    return "torch"


def write_repository(
    args: argparse.Namespace, kind: str, description: ModelDescription, config: str, file_name: str
) -> Path:
    """REPO/NAME/config.pbtxt and REPO/NAME/VERSION/`file_name`, per the module docstring's rules."""
    model_dir = args.output / args.name
    version_dir = model_dir / str(args.version)
    config_file = model_dir / "config.pbtxt"
    if version_dir.exists() and not args.force:
        raise SeldonCaffeError(f"{version_dir} exists; pass --force to replace it, or choose another --version")
    if config_file.is_file() and config_file.read_text() != config and not args.force:
        raise SeldonCaffeError(f"{config_file} exists with other settings; pass --force to replace it")
    model_dir.mkdir(parents=True, exist_ok=True)
    # Build the version in a scratch directory beside it, then move it in: a failed
    # conversion leaves the repository as it was.
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".incoming-") as scratch:
        staged = Path(scratch, "version")
        staged.mkdir()
        _model_file(args, kind, description, staged / file_name)
        if version_dir.exists():
            shutil.rmtree(version_dir)
        staged.rename(version_dir)
    config_file.write_text(config)
    return model_dir


def _model_file(args: argparse.Namespace, kind: str, description: ModelDescription, target: Path) -> None:
    if kind in ("onnx", "plan"):
        shutil.copyfile(args.model, target)
        if kind == "onnx":
            for name in external_data_files(args.model):  # a model over 2 GB keeps its weights beside it
                shutil.copyfile(args.model.parent / name, target.parent / name)
            check_signature(target, description)
        return
    if kind == "tensorflow":
        from .tensorflow import saved_model_to_onnx

        errors = saved_model_to_onnx(args.model, description, target, opset=args.opset, tolerance=args.tolerance)
        print(format_errors(errors, "TensorFlow"))
        return
    from .torch import load_torch_model, torch_to_onnx

    model = load_torch_model(args.model, args.class_spec)
    errors = torch_to_onnx(model, description, target, opset=args.opset, tolerance=args.tolerance)
    print(format_errors(errors, "PyTorch"))


def external_data_files(path: Path) -> list[str]:
    """The files an ONNX model keeps its external weights in, relative to its directory."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return sorted(names)


def model_config(
    name: str,
    description: ModelDescription,
    *,
    platform: str,
    precision: str = "fp32",
    device: str = "gpu",
    instances: int = 1,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> str:
    """config.pbtxt text for the model (Triton's ModelConfig message in protobuf text format)."""
    batched = description.batch_size > 0
    fields: dict[str, Any] = {
        "name": name,
        "platform": platform,
        "max_batch_size": description.batch_size,
        "input": [_tensor(t, batched) for t in description.inputs],
        "output": [_tensor(t, batched) for t in description.outputs],
    }
    if batched:
        fields["dynamic_batching"] = {"max_queue_delay_microseconds": max_queue_delay_us}
    fields["instance_group"] = [{"count": instances, "kind": Enum(f"KIND_{device.upper()}")}]
    if platform == PLATFORMS["onnx"][0] and device == "gpu":
        parameters = {"precision_mode": precision.upper(), "max_workspace_size_bytes": str(WORKSPACE_BYTES)}
        accelerator = {"name": "tensorrt", "parameters": [{"key": k, "value": v} for k, v in parameters.items()]}
        fields["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [accelerator]}}
    return "".join(_text(key, value, 0) for key, value in fields.items())


def _tensor(tensor: TensorDescription, batched: bool) -> dict[str, Any]:
    dims = tensor.dims[1:] if batched else tensor.dims
    # A batched scalar per item (dims [-1]) is [1] to Triton: dims may not be empty.
    return {"name": tensor.name, "data_type": Enum(tensor.triton_type), "dims": list(dims) or [1]}


def _text(key: str, value: Any, depth: int) -> str:
    """One field in protobuf text format: messages nest, repeated fields are [ lists ]."""
    pad = "  " * depth
    if isinstance(value, dict):
        body = "".join(_text(k, v, depth + 1) for k, v in value.items())
        return f"{pad}{key} {{\n{body}{pad}}}\n"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        inner = "  " * (depth + 1)
        entries = [f"{inner}{{\n{''.join(_text(k, v, depth + 2) for k, v in item.items())}{inner}}}" for item in value]
        return f"{pad}{key} [\n" + ",\n".join(entries) + f"\n{pad}]\n"
    if isinstance(value, list):
        return f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]\n"
    return f"{pad}{key}: {_scalar(value)}\n"


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
