"""`seldon-caffe convert caffe`: a Caffe net to ONNX, or to torch, with no Caffe installed.

The converters are seldon_caffe/caffe/to_onnx.py and, for `-o model.pt2` (an ExportedProgram)
or `-o model.pt` (TorchScript), seldon_caffe/caffe/to_torch.py, which rebuilds that ONNX
graph in torch. This module is only their command line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import _Subparsers, describe_values, opset_type


def add_parser(formats: _Subparsers) -> None:
    caffe = formats.add_parser(
        "caffe",
        help="Caffe prototxt + caffemodel -> ONNX or torch (no Caffe needed)",
        description="Convert a Caffe net to ONNX (-o X.onnx), a torch ExportedProgram (-o X.pt2) or a "
        "TorchScript archive (-o X.pt). Outputs keep their Caffe blob names.",
    )
    caffe.add_argument("prototxt", type=Path)
    caffe.add_argument("weights", type=Path, help="the .caffemodel")
    caffe.add_argument("-o", "--output", type=Path, required=True, help="the file to write: .onnx, .pt2 or .pt")
    caffe.add_argument(
        "--opset", type=opset_type, help="ONNX opset, 13 or later (default: the converter's, see docs/onnx.md)"
    )
    caffe.add_argument(
        "--batch", type=_batch, default=None, help="'dynamic' (default: any batch size) or a fixed batch size"
    )
    caffe.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw a progress bar on stderr (default: when stderr is a terminal)",
    )
    caffe.set_defaults(handler=convert_caffe_command)


def _batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'dynamic' or a positive integer")
    return int(text)


def convert_caffe_command(args: argparse.Namespace) -> int:
    from ..extras import require_modules

    require_modules("onnx")
    from ..caffe.to_onnx import DEFAULT_OPSET, convert_files
    from ..paths import check_output_path

    check_output_path(args.output)

    args.opset = args.opset or DEFAULT_OPSET
    start = time.perf_counter()
    if args.output.suffix in TORCH_SUFFIXES:
        what = _convert_to_torch(args)
    else:
        model = convert_files(
            args.prototxt, args.weights, args.output, opset=args.opset, batch=args.batch, progress=args.progress
        )
        graph = model.graph
        what = f"{len(graph.node)} ONNX nodes, opset {args.opset}, inputs {describe_values(graph.input)}"
        what += f", outputs {describe_values(graph.output)}"
    print(f"wrote {args.output}: {what} ({time.perf_counter() - start:.1f} s)")
    return 0


TORCH_SUFFIXES = (".pt2", ".pt")


def _convert_to_torch(args: argparse.Namespace) -> str:
    from ..extras import require_modules

    require_modules("torch")
    from ..caffe import load_caffe_net
    from ..caffe.to_onnx import caffe_to_onnx
    from ..caffe.to_torch import save_torch

    net = load_caffe_net(args.prototxt, args.weights)
    model = caffe_to_onnx(net, opset=args.opset, batch=args.batch, progress=args.progress)
    kind = save_torch(model, args.output)
    graph = model.graph
    return f"{kind}, inputs {describe_values(graph.input)}, outputs {describe_values(graph.output)}"
