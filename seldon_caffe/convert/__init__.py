"""`seldon-caffe convert`: turn a model into another format, one subcommand per source format.

    seldon-caffe convert caffe PROTOTXT WEIGHTS -o MODEL.onnx
    seldon-caffe convert tensorflow SAVED_MODEL --config config.txt -o MODEL.onnx
    seldon-caffe convert torch MODEL --config config.txt -o MODEL.onnx
    seldon-caffe convert tensorrt MODEL.onnx -o MODEL.plan --precision fp16
    seldon-caffe convert triton MODEL --config config.txt --name NAME -o REPO

Each format is one module of this package with an `add_parser(formats)` that adds its
subcommand; `SOURCES` lists them. Modules import their framework (TensorFlow, torch,
TensorRT) only when their command runs, so `seldon-caffe --help` stays fast and a missing
framework fails only the command that needs it. The Caffe converter itself lives in
seldon_caffe/caffe/to_onnx.py; this module only wires its command.
"""

from __future__ import annotations

import argparse
import importlib

_Subparsers = argparse._SubParsersAction


def register(sub: _Subparsers) -> None:
    """Add `convert` and its per-format subcommands to the `seldon-caffe` command."""
    convert = sub.add_parser("convert", help="convert a model to another format (caffe -> onnx, ...)")
    formats = convert.add_subparsers(dest="source_format", required=True, metavar="FORMAT")
    for module in SOURCES:
        importlib.import_module(f"{__name__}.{module}").add_parser(formats)


# The modules of this package that add a `convert` subcommand, in --help order.
SOURCES = ("caffe", "tensorflow", "torch", "tensorrt", "triton")


def describe_values(values) -> str:  # repeated onnx.ValueInfoProto
    parts = []
    for value in values:
        dims = [
            d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?")
            for d in value.type.tensor_type.shape.dim
        ]
        parts.append(f"{value.name}[{', '.join(dims)}]")
    return ", ".join(parts)


def opset_type(text: str) -> int:
    """argparse type of --opset: an ONNX opset this project's converters and the onnx package both know."""
    import onnx

    from ..caffe.onnx_graph import MIN_OPSET

    newest = onnx.defs.onnx_opset_version()
    if not text.isdigit() or not MIN_OPSET <= int(text) <= newest:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an opset from {MIN_OPSET} to {newest}")
    return int(text)


def add_tolerance(parser: argparse.ArgumentParser) -> None:
    """--tolerance, for the converters that check their output against the source framework."""
    from .check import DEFAULT_TOLERANCE

    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest relative error accepted against the source on random inputs (default {DEFAULT_TOLERANCE:g})",
    )
