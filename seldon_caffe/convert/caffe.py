"""`seldon-caffe convert caffe`: a Caffe net to ONNX, with no Caffe installed.

The converter is seldon_caffe/caffe/to_onnx.py; this module is only its command line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import _Subparsers, describe_values, opset_type


def add_parser(formats: _Subparsers) -> None:
    caffe = formats.add_parser(
        "caffe",
        help="Caffe prototxt + caffemodel -> ONNX (no Caffe needed)",
        description="Convert a Caffe net to ONNX. Outputs keep their Caffe blob names.",
    )
    caffe.add_argument("prototxt", type=Path)
    caffe.add_argument("weights", type=Path, help="the .caffemodel")
    caffe.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
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
    from ..quantize import _require

    _require("onnx")
    from ..caffe.to_onnx import DEFAULT_OPSET, convert_files

    args.opset = args.opset or DEFAULT_OPSET
    start = time.perf_counter()
    model = convert_files(
        args.prototxt, args.weights, args.output, opset=args.opset, batch=args.batch, progress=args.progress
    )
    graph = model.graph
    print(
        f"wrote {args.output}: {len(graph.node)} ONNX nodes, opset {args.opset}, "
        f"inputs {describe_values(graph.input)}, outputs {describe_values(graph.output)} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0
