"""`seldon-caffe bench TARGET --request FILE`: served throughput and latency, as clients see them.

Users judge a model server by what comes over the wire: requests per second and tail latency at
a given concurrency. Triton's perf_analyzer measures that, but its wheel needs a newer glibc
than common serving hosts have and it speaks only the V2 protocol, so this is our own, modelled
on it: closed-loop clients at each `--concurrency` (or fixed arrivals with `--rate`), spread over
processes (clients.py, load.py), and a report (report.py) with the server's own stage timings
read from its metrics endpoint, so it shows where the time goes: wire and decoding, or the model.

TARGET is a running service (`http://HOST:PORT`, `HOST:PORT`) or a model directory, which bench
serves itself on free ports (`seldon-caffe serve`, with `--protocol v2` for the V2 protocols) for
the run and stops afterwards. Over V2 the model is the one the server lists as ready, or --model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import SeldonCaffeError
from ..paths import check_output_path
from .clients import PROTOCOLS, Request, host_port, v2_infer_proto, v2_model
from .load import Plan, processes_for, run_level
from .report import plot, scrape_stages, stage_ms, summarize, table, write_csv

DEFAULT_PORTS = {"seldon-rest": 9000, "seldon-grpc": 5000, "v2-rest": 8080, "v2-grpc": 8081}
START_TIMEOUT_S = 300


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bench` to the `seldon-caffe` command."""
    parser = sub.add_parser(
        "bench",
        help="served requests/s and latency at given concurrencies (like Triton's perf_analyzer)",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[-1].replace("\n", " "),
    )
    parser.add_argument("target", help="http://HOST:PORT, HOST:PORT, or a model directory to serve for the run")
    parser.add_argument(
        "--request",
        type=Path,
        required=True,
        help="the request: a Seldon message (.json; over V2 an inference request), or a file sent as binData "
        "(over V2: a BYTES input, the model's first)",
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="seldon-rest")
    parser.add_argument("--model", help="V2: the model to load (default: the one the server lists as ready)")
    parser.add_argument("--concurrency", type=_levels, default=[1, 2, 4, 8], help="clients, e.g. 1,2,4,8 (default)")
    parser.add_argument("--rate", type=float, help="open loop instead: this many requests per second in all")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per level (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each window (default 2)")
    parser.add_argument(
        "--metrics", help="the service's Prometheus URL, for its stage timings (e.g. http://HOST:6000/metrics)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="with a model directory and a Seldon protocol: serve's --workers"
    )
    parser.add_argument("--csv", type=Path, help="also write the results here (perf_analyzer's column names)")
    parser.add_argument(
        "--plot", type=Path, help="also draw throughput against p99 latency here (.png; needs matplotlib)"
    )
    parser.set_defaults(handler=bench_command)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas, e.g. 1,2,4,8")
    return levels


def bench_command(args: argparse.Namespace) -> int:
    for path in (args.csv, args.plot):
        if path is not None:
            check_output_path(path)
    if args.duration <= 0 or args.warmup < 0 or (args.rate is not None and args.rate <= 0):
        raise SeldonCaffeError("--duration and --rate must be positive, --warmup not negative")
    if not args.protocol.startswith("v2-") and args.model is not None:
        raise SeldonCaffeError("--model is for the V2 protocols: a Seldon service serves one model")
    if args.protocol.startswith("v2-") and args.workers != 1:
        raise SeldonCaffeError("--workers is for the Seldon protocols: the V2 server runs one process")
    request = Request.from_file(args.request, args.protocol)
    rows: list[dict] = []
    try:
        interrupted = _run_levels(args, request, rows)
    except KeyboardInterrupt:  # between levels, or while the service started: what ran is reported
        interrupted = True
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr)
    print(table(rows))
    if args.csv is not None and rows:
        write_csv(rows, args.csv)
    if args.plot is not None and rows:
        plot(rows, args.plot, f"{args.target}, {args.protocol}, {request.source}")
    if interrupted:
        partial = ": the last level is partial" if rows and rows[-1]["partial"] else ""
        print(f"seldon-caffe: interrupted{partial}", file=sys.stderr)
        return 130
    return 0


def _run_levels(args: argparse.Namespace, request: Request, rows: list[dict]) -> bool:
    """Each level in turn, its row appended as it ends; True when Ctrl-C cut a level short."""
    with _target(args) as target:
        levels = [None] if args.rate is not None else args.concurrency
        protocol = args.protocol
        if protocol.startswith("v2-"):
            request = request.for_model(*v2_model(protocol, target.host, target.port, args.model))
            if protocol == "v2-grpc":
                v2_infer_proto(request)  # a request gRPC cannot carry is one line here, not a dead client
            protocol += f" (model {request.model})"
        print(
            f"seldon-caffe bench: {target.describe} over {protocol}, request {request.source}; "
            f"{args.duration:g} s per level after {args.warmup:g} s of warm-up",
            flush=True,
        )
        for level in levels:
            concurrency = level if level is not None else processes_for(os.cpu_count() or 1)
            plan = Plan(
                args.protocol, target.host, target.port, request, concurrency, args.warmup, args.duration, args.rate
            )
            before = scrape_stages(target.metrics)
            result = run_level(plan, _progress(level, args.rate) if sys.stderr.isatty() else None)
            rows.append(summarize(result, stage_ms(before, scrape_stages(target.metrics))))
            if result.partial:
                return True
    return False


def _progress(level: int | None, rate: float | None) -> object:
    label = f"c={level}" if level is not None else f"{rate:g}/s"

    def show(done: int, failed: int, elapsed: float) -> None:
        print(
            f"\r\033[K{label}: {elapsed:5.1f} s, {done} requests, {failed} errors", end="", file=sys.stderr, flush=True
        )

    return show


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    metrics: str | None
    describe: str


@contextlib.contextmanager
def _target(args: argparse.Namespace) -> Iterator[Target]:
    """The endpoint to load: the one given, or a service of the model directory for the run."""
    if not Path(args.target).is_dir():
        host, port = host_port(args.target, DEFAULT_PORTS[args.protocol])
        yield Target(host, port, args.metrics, f"{host}:{port}")
        return
    ports = {"rest": _free_port(), "grpc": _free_port(), "metrics": _free_port()}
    with _served(Path(args.target), ports, args.workers, args.protocol):
        port = ports["rest"] if args.protocol.endswith("-rest") else ports["grpc"]
        metrics = args.metrics or f"http://127.0.0.1:{ports['metrics']}/metrics"
        yield Target("127.0.0.1", port, metrics, f"{args.target} (served for the run)")


@contextlib.contextmanager
def _served(model_dir: Path, ports: dict[str, int], workers: int, protocol: str) -> Iterator[Path]:
    """`seldon-caffe serve` (`--protocol v2` for the V2 protocols) in its own session; stopped
    (SIGTERM, then SIGKILL) whatever happens. Its log is removed afterwards unless it failed to
    start (the error names it then)."""
    log = Path(tempfile.mkstemp(prefix="seldon-caffe-bench-", suffix=".log")[1])
    serves = "v2" if protocol.startswith("v2-") else "seldon"
    command = [sys.executable, "-m", "seldon_caffe.cli", "serve", str(model_dir), "--protocol", serves]
    command += ["--workers", str(workers)] if serves == "seldon" else []
    command += [
        "--http-port",
        str(ports["rest"]),
        "--grpc-port",
        str(ports["grpc"]),
        "--metrics-port",
        str(ports["metrics"]),
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(process, ports, log, serves)
        yield log
        log.unlink(missing_ok=True)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_ready(process: subprocess.Popen, ports: dict[str, int], log: Path, protocol: str) -> None:
    from ..server import service_ready

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise SeldonCaffeError(f"the service stopped before it was ready (log {log}): {' | '.join(tail)}")
        if service_ready(ports["rest"], [ports["grpc"], ports["metrics"]], protocol=protocol):
            return
        time.sleep(0.3)
    raise SeldonCaffeError(f"the service was not ready after {START_TIMEOUT_S} s (log: {log})")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
