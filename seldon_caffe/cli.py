"""The `seldon-caffe` command: serve, predict, inspect (and the commands later modules add).

Each subcommand is a small function taking the parsed arguments. Errors the user can fix
are printed as one line, `seldon-caffe: error: ...`, with exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import bench, convert, k8s, quantize, scaffold, weights
from .errors import SeldonCaffeError
from .limits import MAX_REQUEST_BYTES_ENV, max_request_bytes
from .paths import check_output_path

PROTOCOLS = ("seldon", "v2")
# port option -> (Seldon v1's pod variable and default, MLServer's (V2) variable and default)
PORTS = {
    "http_port": (("PREDICTIVE_UNIT_HTTP_SERVICE_PORT", 9000), ("MLSERVER_HTTP_PORT", 8080)),
    "grpc_port": (("PREDICTIVE_UNIT_GRPC_SERVICE_PORT", 5000), ("MLSERVER_GRPC_PORT", 8081)),
    "metrics_port": (("PREDICTIVE_UNIT_METRICS_SERVICE_PORT", 6000), ("MLSERVER_METRICS_PORT", 8082)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seldon-caffe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve a model directory as a microservice (Seldon v1 or V2 protocol)",
        description="Serve MODEL_DIR until SIGTERM/SIGINT (which drain in-flight requests): over Seldon's "
        "REST and gRPC APIs (--protocol seldon), or over the V2 / Open Inference Protocol on MLServer "
        "(--protocol v2, as Seldon Core v2 and KServe speak it). Defaults come from the variables a pod "
        "sets: Seldon's for seldon, MLServer's for v2.",
    )
    serve.add_argument(
        "model_dir",
        type=Path,
        nargs="?",
        help="default: Seldon's model_dir parameter, $SELDON_CAFFE_MODEL_DIR, /mnt/models",
    )
    serve.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=os.environ.get("SELDON_CAFFE_PROTOCOL") or "seldon",
        help="seldon (v1, the default; $SELDON_CAFFE_PROTOCOL) or v2 (needs the mlserver extra)",
    )
    for option, (seldon, v2) in PORTS.items():
        serve.add_argument(
            f"--{option.replace('_', '-')}",
            type=int,
            help=f"default ${seldon[0]} or {seldon[1]}; with --protocol v2, ${v2[0]} or {v2[1]}",
        )
    serve.add_argument("--workers", type=int, default=_env_int("GUNICORN_WORKERS", 1), help="REST processes (v1)")
    serve.add_argument(
        "--threads",
        type=int,
        default=_env_int("GUNICORN_THREADS", 4),
        help="threads per REST worker (v1); with v2, the threads running hooks and the engine",
    )
    serve.add_argument("--grpc-workers", type=int, default=_env_int("GRPC_WORKERS", 1), help="gRPC processes (v1)")
    grpc_threads = _env_int("GRPC_THREADS", 4)
    serve.add_argument("--grpc-threads", type=int, default=grpc_threads, help="threads per gRPC process (v1)")
    serve.add_argument(
        "--max-request-mb",
        type=float,
        default=max_request_bytes() / 2**20,
        help="largest request (REST body, gRPC message, decoded payload) in MiB; default 64",
    )
    add_runtime_option(serve)
    serve.add_argument(
        "--verbose", action="store_true", help="also Seldon's, Flask's and gunicorn's start-up logs, per process"
    )
    serve.set_defaults(handler=serve_command)

    predict = sub.add_parser(
        "predict",
        help="answer one request without a server",
        description="Answer one request as the REST endpoint would, without a server. A JSON answer is "
        "printed; a binary one (arrays as .npy/.npz) is summarised: each array's name, dtype, shape and, for "
        "a 2-D float array, its top 5 per row. --out writes the answer itself.",
    )
    predict.add_argument("model_dir", type=Path)
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help='a Seldon JSON message, e.g. \'{"data": {"ndarray": [[1, 2]]}}\'')
    source.add_argument("--file", type=Path, help="a .json Seldon message, or any other file sent as binData")
    add_runtime_option(predict)
    predict.add_argument("--out", type=Path, help="write the answer to this file (binary answers: the raw bytes)")
    predict.add_argument("--traceback", action="store_true", help="on an error, show where it was raised")
    predict.set_defaults(handler=predict_command)

    inspect = sub.add_parser("inspect", help="show the signature, runtime and hooks of a model directory")
    inspect.add_argument("model_dir", type=Path)
    add_runtime_option(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument(
        "--accuracy",
        type=Path,
        metavar="SAMPLES",
        help="also compare bf16 and int8 with fp32 on these inputs (.npy/.npz, or files for the preprocess hook)",
    )
    inspect.add_argument("--samples", type=int, default=64, help="with --accuracy: use at most this many files")
    inspect.set_defaults(handler=inspect_command)

    scaffold.register(sub)
    weights.register(sub)
    k8s.register(sub)
    convert.register(sub)
    quantize.register(sub)
    bench.register(sub)
    return parser


def serve_command(args: argparse.Namespace) -> int:
    """Check the ports and that the model loads, then become the service (server.py) until
    SIGTERM/SIGINT."""
    from .config import MODEL_DIR_ENV, default_model_dir, seldon_parameter
    from .server import ServeOptions, check_ports, configure_logging

    model_dir = (args.model_dir or default_model_dir()).resolve()
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
        protocol=args.protocol,
        max_request_bytes=max_request_bytes,
        verbose=args.verbose,
        **counts,
        **_ports(args),  # type: ignore[arg-type]  # ports only: ints, as the fields are
    )
    configure_logging(args.verbose)  # the check-load below logs conversions it caches
    check_ports(options)  # before the model load below, which can take a while
    # Every process of the service (and the hooks' payload checks) reads the same limit.
    os.environ[MAX_REQUEST_BYTES_ENV] = str(max_request_bytes)
    # Load once here: a broken model then stops start-up with our one-line message,
    # instead of a server dying with a traceback in a loop.
    runtime, model_name = _check_load(options)
    options = replace(_batching_concurrency(options), model_name=model_name)
    os.environ[MODEL_DIR_ENV] = str(model_dir)
    if options.protocol == "v2":
        print(
            f"serving {model_dir} ({runtime}) over V2 on MLServer: REST :{options.http_port}, gRPC "
            f":{options.grpc_port}, metrics :{options.metrics_port} ({options.threads} threads)",
            flush=True,
        )
    else:
        print(
            f"serving {model_dir} ({runtime}): REST :{options.http_port} "
            f"({options.workers}x{options.threads} threads), gRPC :{options.grpc_port} "
            f"({options.grpc_workers}x{options.grpc_threads} threads), metrics :{options.metrics_port}",
            flush=True,
        )
    # A fresh interpreter supervises the servers: this one has started the model's engine.
    os.execv(sys.executable, [sys.executable, "-m", "seldon_caffe.server", options.to_json()])
    return 0  # not reached


def _batching_concurrency(options: Any) -> Any:
    """With batching on, requests merge only when they wait in one process at once: every
    server gets at least max_batch_size threads. Processes do not share a queue, so with
    --workers N each REST worker batches its own requests, and REST and gRPC never merge."""
    from dataclasses import replace

    from .config import load_config

    batching = load_config(options.model_dir, options.runtime).batching
    if batching is None:
        return options
    if options.workers > 1 or options.grpc_workers > 1:
        print(
            "seldon-caffe: warning: batching merges requests within one process; with several workers "
            "(--workers, --grpc-workers) each batches only its own share",
            file=sys.stderr,
        )
    need = batching.max_batch_size
    return replace(options, threads=max(options.threads, need), grpc_threads=max(options.grpc_threads, need))


def _check_load(options: Any) -> tuple[str, str]:
    """Load the model as the service will, then close it; the runtime's name and the model's.

    Seldon's servers get the signature handed over ($SELDON_CAFFE_METADATA): they must not
    open the model before they fork. The V2 route loads through the Pipeline alone, so it
    never imports seldon_core.
    """
    if options.protocol == "v2":
        import importlib.util

        from .pipeline import Pipeline

        if importlib.util.find_spec("mlserver") is None:
            raise SeldonCaffeError("--protocol v2 runs MLServer, not installed: pip install 'seldon-caffe[mlserver]'")
        pipeline = Pipeline.load(options.model_dir, options.runtime)
        pipeline.close()
        return pipeline.model.name, pipeline.config.name
    from .model import METADATA_ENV, SeldonCaffeModel

    preflight = SeldonCaffeModel(str(options.model_dir), options.runtime)
    pipeline = preflight.load()
    os.environ[METADATA_ENV] = json.dumps(preflight.init_metadata())
    pipeline.model.close()
    return pipeline.model.name, pipeline.config.name


def _ports(args: argparse.Namespace) -> dict[str, int]:
    """Each port: the command line's, else the protocol's pod variable, else its default."""
    column = 1 if args.protocol == "v2" else 0
    return {
        option: getattr(args, option) if getattr(args, option) is not None else _env_int(*pair[column])
        for option, pair in PORTS.items()
    }


def predict_command(args: argparse.Namespace) -> int:
    from .model import predict_once

    request: dict[str, Any] | bytes
    if args.data is not None:
        request = _parse_request(args.data, "--data")
    elif args.file.suffix == ".json":
        request = _parse_request(_read(args.file).decode(), str(args.file))
    else:
        request = _read(args.file)
    if args.out is not None:
        check_output_path(args.out)
    # This command reports a failed request itself (one line, or --traceback); the server's log
    # line for it would say the same thing twice.
    logging.getLogger("seldon_caffe.model").disabled = True
    answer = predict_once(args.model_dir, request, args.runtime)
    binary = base64.b64decode(answer["binData"]) if isinstance(answer.get("binData"), str) else None
    if args.out is not None:
        args.out.write_bytes(binary if binary is not None else json.dumps(answer).encode() + b"\n")
    print(summarize_arrays(binary) if binary is not None else json.dumps(answer))
    return 0


def summarize_arrays(data: bytes, top: int = 5) -> str:
    """What a binary answer holds: each array's name, dtype and shape; top-k per row of a 2-D float array."""
    import io

    import numpy as np

    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError:
        return f"a binary answer of {len(data)} bytes that is not .npy/.npz (--out FILE saves it)"
    arrays = dict(loaded.items()) if isinstance(loaded, np.lib.npyio.NpzFile) else {"answer": loaded}
    lines = []
    for name, array in arrays.items():
        lines.append(f"{name}: {array.dtype}{list(array.shape)}")
        if array.ndim == 2 and array.dtype.kind == "f":
            for i, row in enumerate(array[:10]):
                best = np.argsort(row)[::-1][:top]
                lines.append(f"  row {i}: " + ", ".join(f"{int(k)}={row[k]:.4g}" for k in best))
            if len(array) > 10:
                lines.append(f"  ... {len(array) - 10} more rows (--out FILE saves them all)")
    return "\n".join(lines)


def inspect_command(args: argparse.Namespace) -> int:
    from .accuracy import format_report, precision_report, report_json
    from .advice import served_file, settings_warnings
    from .config import load_config
    from .model import describe, layer_table, warnings_for
    from .runtimes import resolve_runtime

    # Warn before loading, so a setting the runtime ignores is reported even if the load fails.
    config = load_config(args.model_dir, args.runtime)
    warnings = warnings_for(args.model_dir, args.runtime) + settings_warnings(config, resolve_runtime(config))
    for warning in warnings:
        print(f"seldon-caffe: warning: {warning}", file=sys.stderr)
    info = {**describe(args.model_dir, args.runtime), "warnings": warnings}
    info["precision"] = config.options["precision"]
    info["layers"] = layer_table(args.model_dir, args.runtime)
    info["unknown"] = _unknown_parts(config)
    info["loaded_file"] = str(served_file(config, info["runtime"]))  # e.g. the cached ONNX of a Caffe net
    report = precision_report(args.model_dir, args.accuracy, args.runtime, args.samples) if args.accuracy else None
    if args.json:
        print(json.dumps({**info, "accuracy": report_json(report) if report else None}, indent=2))
        return 0
    print(f"model     {info['name']} ({info['format']})")
    asked = "" if info["runtime_asked"] == info["runtime"] else f" (model.yaml: {info['runtime_asked']})"
    print(f"runtime   {info['runtime']}{asked}")
    if info["auto"]:
        print(f"          {info['auto']['summary']}")
    print(f"precision {info['precision']}")
    for key, path in info["files"].items():
        print(f"file      {key}: {path}")
    print(f"file      loaded: {info['loaded_file']}")
    for direction in ("inputs", "outputs"):
        for spec in info[direction]:
            dims = ", ".join("N" if d == -1 else str(d) for d in spec["shape"])
            print(f"{direction[:-1]:<9} {spec['name']}: {spec['dtype']}[{dims}]")
    hooks = ", ".join(info["hooks"]) or "none (defaults)"
    print(f"hooks     {hooks}" + (f" from {info['hooks_file']}" if info["hooks_file"] else ""))
    _print_layer_table(info["layers"])
    _print_unknown(info["unknown"])
    if report:
        print(format_report(report))
    return 0


def _print_layer_table(table: dict[str, dict]) -> None:
    """One line per layer type: the engines that run it, then those that do not and why."""
    for i, (kind, row) in enumerate(table.items()):
        engines = " ".join(row["engines"]) or "none of ours"
        print(f"{'layers' if i == 0 else '':<9} {kind} x{row['count']}: {engines}")
        for engine, why in row["not"].items():
            print(f"{'':<11}not {engine}: {why}")


def _unknown_parts(config: Any) -> dict[str, list]:
    """What of a Caffe net our caffe.proto and shape rules do not know: the fields skipped on
    reading (tolerant.UnknownField as dicts) and the layer types without a shape rule."""
    if config.format != "caffe":
        return {"fields": [], "layer_types": []}
    from .caffe.tolerant import unknown_fields, unsupported_types

    prototxt = config.files["prototxt"]
    fields = [f._asdict() | {"text": f.describe()} for f in unknown_fields(prototxt.read_bytes())]
    return {"fields": fields, "layer_types": unsupported_types(prototxt)}


def _print_unknown(unknown: dict[str, list]) -> None:
    for entry in unknown["fields"]:
        print(f"unknown   field {entry['text']}: skipped, no Caffe fork we know defines it")
    for kind in unknown["layer_types"]:
        print(f"unknown   layer type {kind}: no engine here implements it (the load error says the ways forward)")


def add_runtime_option(parser: argparse.ArgumentParser) -> None:
    """--runtime, with its choices listed (a wrong one is the command line's fault, not model.yaml's)."""
    from .runtimes import REGISTRY

    choices = ("auto", *REGISTRY)
    parser.add_argument(
        "--runtime", choices=choices, metavar="RUNTIME", help=f"override model.yaml's runtime: {', '.join(choices)}"
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("seldon-caffe")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


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
    # TensorFlow (which seldon-core imports whenever it is installed) prints oneDNN and CPU
    # feature notices in every process at its default level; warnings and errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
