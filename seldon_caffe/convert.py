"""`seldon-caffe convert`: turn a model into another format, one subcommand per source format.

    seldon-caffe convert caffe PROTOTXT WEIGHTS -o MODEL.onnx [--opset N] [--batch dynamic|N]

Each source format is one entry in `SOURCES`: a function that adds its subparser. A later
format (tensorflow, torch, tensorrt, triton...) adds its function there and nothing else
changes; the logic of each conversion lives in its own module (for Caffe,
seldon_caffe/caffe/to_onnx.py), never here.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

_Subparsers = argparse._SubParsersAction


def register(sub: _Subparsers) -> None:
    """Add `convert` and its per-format subcommands to the `seldon-caffe` command."""
    convert = sub.add_parser("convert", help="convert a model to another format (caffe -> onnx, ...)")
    formats = convert.add_subparsers(dest="source_format", required=True, metavar="FORMAT")
    for add in SOURCES.values():
        add(formats)


def _add_caffe(formats: _Subparsers) -> None:
    caffe = formats.add_parser(
        "caffe",
        help="Caffe prototxt + caffemodel -> ONNX (no Caffe needed)",
        description="Convert a Caffe net to ONNX. Outputs keep their Caffe blob names.",
    )
    caffe.add_argument("prototxt", type=Path)
    caffe.add_argument("weights", type=Path, help="the .caffemodel")
    caffe.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    caffe.add_argument(
        "--opset", type=_opset, help="ONNX opset, 13 or later (default: the converter's, see docs/onnx.md)"
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


SOURCES: dict[str, Callable[[_Subparsers], None]] = {"caffe": _add_caffe}


def convert_caffe_command(args: argparse.Namespace) -> int:
    from .quantize import _require

    _require("onnx")
    from .caffe.to_onnx import DEFAULT_OPSET, convert_files

    args.opset = args.opset or DEFAULT_OPSET
    start = time.perf_counter()
    model = convert_files(
        args.prototxt, args.weights, args.output, opset=args.opset, batch=args.batch, progress=args.progress
    )
    graph = model.graph
    print(
        f"wrote {args.output}: {len(graph.node)} ONNX nodes, opset {args.opset}, "
        f"inputs {_describe(graph.input)}, outputs {_describe(graph.output)} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


def _describe(values) -> str:  # noqa: ANN001 (repeated onnx.ValueInfoProto)
    parts = []
    for value in values:
        dims = [
            d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?")
            for d in value.type.tensor_type.shape.dim
        ]
        parts.append(f"{value.name}[{', '.join(dims)}]")
    return ", ".join(parts)


def _batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'dynamic' or a positive integer")
    return int(text)


def _opset(text: str) -> int:
    import onnx

    from .caffe.onnx_graph import MIN_OPSET

    newest = onnx.defs.onnx_opset_version()
    if not text.isdigit() or not MIN_OPSET <= int(text) <= newest:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an opset from {MIN_OPSET} to {newest}")
    return int(text)
