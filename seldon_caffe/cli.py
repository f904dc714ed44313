"""The `seldon-caffe` command: serve, predict, inspect (and the commands later modules add).

Each subcommand is a small function taking the parsed arguments. Errors the user can fix
are printed as one line, `seldon-caffe: error: ...`, with exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import convert, k8s, quantize, scaffold
from .errors import SeldonCaffeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seldon-caffe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve a model directory as a Seldon microservice")
    serve.add_argument("model_dir", type=Path)
    serve.add_argument("--http-port", type=int, default=9000)
    serve.add_argument("--grpc-port", type=int, default=5000)
    serve.add_argument("--metrics-port", type=int, default=6000)
    serve.add_argument("--workers", type=int, default=1, help="REST worker processes (gunicorn)")
    serve.add_argument("--threads", type=int, default=1, help="threads per REST worker")
    serve.add_argument("--runtime", help="override model.yaml's runtime")
    serve.set_defaults(handler=serve_command)

    predict = sub.add_parser("predict", help="answer one request without a server; prints JSON")
    predict.add_argument("model_dir", type=Path)
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help='a Seldon JSON message, e.g. \'{"data": {"ndarray": [[1, 2]]}}\'')
    source.add_argument("--file", type=Path, help="a .json Seldon message, or any other file sent as binData")
    predict.add_argument("--runtime", help="override model.yaml's runtime")
    predict.set_defaults(handler=predict_command)

    inspect = sub.add_parser("inspect", help="show the signature, runtime and hooks of a model directory")
    inspect.add_argument("model_dir", type=Path)
    inspect.add_argument("--runtime", help="override model.yaml's runtime")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(handler=inspect_command)

    scaffold.register(sub)
    k8s.register(sub)
    convert.register(sub)
    quantize.register(sub)
    return parser


def serve_command(args: argparse.Namespace) -> int:
    """Check that the model loads, then become Seldon's microservice serving it."""
    from .model import METADATA_ENV, SeldonCaffeModel

    model_dir = args.model_dir.resolve()
    # Load once here: a broken model then stops start-up with our one-line message,
    # instead of a gunicorn worker dying with a traceback in a loop. Its signature is
    # handed to Seldon's parent process, which must not open the model itself.
    preflight = SeldonCaffeModel(str(model_dir), args.runtime)
    preflight.load()
    os.environ[METADATA_ENV] = json.dumps(preflight.init_metadata())
    preflight.model.close()

    parameters = [{"name": "model_dir", "value": str(model_dir), "type": "STRING"}]
    if args.runtime:
        parameters.append({"name": "runtime", "value": args.runtime, "type": "STRING"})
    argv = [
        sys.executable,
        "-m",
        "seldon_core.microservice",
        "seldon_caffe.SeldonCaffeModel",
        "--service-type",
        "MODEL",
        "--http-port",
        str(args.http_port),
        "--grpc-port",
        str(args.grpc_port),
        "--metrics-port",
        str(args.metrics_port),
        "--workers",
        str(args.workers),
        "--threads",
        str(args.threads),
        "--parameters",
        json.dumps(parameters),
    ]
    sys.stdout.flush()
    os.environ["SELDON_CAFFE_MODEL_DIR"] = str(model_dir)
    os.execv(sys.executable, argv)
    return 0  # not reached


def predict_command(args: argparse.Namespace) -> int:
    from .model import predict_once

    request: dict[str, Any] | bytes
    if args.data is not None:
        request = _parse_request(args.data, "--data")
    elif args.file.suffix == ".json":
        request = _parse_request(_read(args.file).decode(), str(args.file))
    else:
        request = _read(args.file)
    print(json.dumps(predict_once(args.model_dir, request, args.runtime)))
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    from .model import describe, warnings_for

    warnings = warnings_for(args.model_dir, args.runtime)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    info = {**describe(args.model_dir, args.runtime), "warnings": warnings}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model     {info['name']} ({info['format']})")
    asked = "" if info["runtime_asked"] == info["runtime"] else f" (model.yaml: {info['runtime_asked']})"
    print(f"runtime   {info['runtime']}{asked}")
    for key, path in info["files"].items():
        print(f"file      {key}: {path}")
    for direction in ("inputs", "outputs"):
        for spec in info[direction]:
            dims = ", ".join("N" if d == -1 else str(d) for d in spec["shape"])
            print(f"{direction[:-1]:<9} {spec['name']}: {spec['dtype']}[{dims}]")
    hooks = ", ".join(info["hooks"]) or "none (defaults)"
    print(f"hooks     {hooks}" + (f" from {info['hooks_file']}" if info["hooks_file"] else ""))
    return 0


def _parse_request(text: str, where: str) -> dict[str, Any]:
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SeldonCaffeError(f"{where} is not valid JSON: {exc}") from None
    if isinstance(message, list):  # a bare array is the common case: send it as ndarray
        message = {"data": {"ndarray": message}}
    if not isinstance(message, dict):
        raise SeldonCaffeError(f'{where}: expected a Seldon message such as {{"data": {{"ndarray": [...]}}}}')
    return message


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SeldonCaffeError(f"cannot read {path}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SeldonCaffeError as error:
        print(f"seldon-caffe: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
