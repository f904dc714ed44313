"""The `seldon-caffe` command: serve, predict, inspect (and the commands later modules add).

Each subcommand is a small function taking the parsed arguments. Errors the user can fix
are printed as one line, `seldon-caffe: error: ...`, with exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import convert, k8s, quantize, scaffold
from .errors import SeldonCaffeError
from .limits import MAX_REQUEST_BYTES_ENV, max_request_bytes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seldon-caffe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve a model directory as a Seldon microservice",
        description="Serve MODEL_DIR over Seldon's REST and gRPC APIs until SIGTERM/SIGINT (which drain "
        "in-flight requests). Defaults come from Seldon's variables, as the operator sets them in a pod.",
    )
    serve.add_argument(
        "model_dir",
        type=Path,
        nargs="?",
        help="default: Seldon's model_dir parameter, $SELDON_CAFFE_MODEL_DIR, /mnt/models",
    )
    serve.add_argument("--http-port", type=int, default=_env_int("PREDICTIVE_UNIT_HTTP_SERVICE_PORT", 9000))
    serve.add_argument("--grpc-port", type=int, default=_env_int("PREDICTIVE_UNIT_GRPC_SERVICE_PORT", 5000))
    serve.add_argument("--metrics-port", type=int, default=_env_int("PREDICTIVE_UNIT_METRICS_SERVICE_PORT", 6000))
    serve.add_argument("--workers", type=int, default=_env_int("GUNICORN_WORKERS", 1), help="REST worker processes")
    serve.add_argument("--threads", type=int, default=_env_int("GUNICORN_THREADS", 4), help="threads per REST worker")
    serve.add_argument("--grpc-workers", type=int, default=_env_int("GRPC_WORKERS", 1), help="gRPC server processes")
    serve.add_argument("--grpc-threads", type=int, default=_env_int("GRPC_THREADS", 4), help="threads per gRPC server")
    serve.add_argument(
        "--max-request-mb",
        type=float,
        default=max_request_bytes() / 2**20,
        help="largest request (REST body, gRPC message, decoded payload) in MiB; default 64",
    )
    serve.add_argument("--runtime", help="override model.yaml's runtime")
    serve.set_defaults(handler=serve_command)

    predict = sub.add_parser("predict", help="answer one request without a server; prints JSON")
    predict.add_argument("model_dir", type=Path)
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help='a Seldon JSON message, e.g. \'{"data": {"ndarray": [[1, 2]]}}\'')
    source.add_argument("--file", type=Path, help="a .json Seldon message, or any other file sent as binData")
    predict.add_argument("--runtime", help="override model.yaml's runtime")
    predict.add_argument("--traceback", action="store_true", help="on an error, show where it was raised")
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
    """Check the ports and that the model loads, then become the service (server.py) until
    SIGTERM/SIGINT."""
    from .model import METADATA_ENV, MODEL_DIR_ENV, SeldonCaffeModel, seldon_parameter
    from .server import ServeOptions, check_ports

    model_dir = (args.model_dir or Path(seldon_parameter("model_dir") or SeldonCaffeModel().model_dir)).resolve()
    counts = {name: getattr(args, name) for name in ("workers", "threads", "grpc_workers", "grpc_threads")}
    for name, value in counts.items():
        if value < 1:
            raise SeldonCaffeError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    max_request_bytes = int(args.max_request_mb * 2**20)
    if max_request_bytes < 1:
        raise SeldonCaffeError(f"--max-request-mb {args.max_request_mb}: expected a positive size")
    options = ServeOptions(
        model_dir=model_dir,
        runtime=args.runtime or seldon_parameter("runtime"),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        max_request_bytes=max_request_bytes,
        **counts,
    )
    check_ports(options)  # before the model load below, which can take a while
    # Every process of the service (and the hooks' payload checks) reads the same limit.
    os.environ[MAX_REQUEST_BYTES_ENV] = str(max_request_bytes)
    # Load once here: a broken model then stops start-up with our one-line message,
    # instead of a gunicorn worker dying with a traceback in a loop. Its signature is
    # handed to the servers, which must not open the model before they fork.
    preflight = SeldonCaffeModel(str(model_dir), options.runtime)
    preflight.load()
    os.environ[METADATA_ENV] = json.dumps(preflight.init_metadata())
    preflight.model.close()
    os.environ[MODEL_DIR_ENV] = str(model_dir)
    print(
        f"serving {model_dir} ({preflight.model.name}): REST :{options.http_port} "
        f"({options.workers}x{options.threads} threads), gRPC :{options.grpc_port} "
        f"({options.grpc_workers}x{options.grpc_threads} threads), metrics :{options.metrics_port}",
        flush=True,
    )
    # A fresh interpreter supervises the servers: this one has started the model's engine.
    os.execv(sys.executable, [sys.executable, "-m", "seldon_caffe.server", options.to_json()])
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


def _env_int(name: str, default: int) -> int:
    """An integer default from the environment (Seldon's pod variables); a bad one is an error."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SeldonCaffeError(f"${name}={raw!r}: expected an integer") from None


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
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except SeldonCaffeError as error:
        if getattr(args, "traceback", False):
            traceback.print_exception(error, file=sys.stderr)
        print(f"seldon-caffe: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
