"""Soak: many requests at a fixed concurrency against a served model; errors, latency, memory.

Serves MODEL itself with `seldon-caffe serve` on free loopback ports (tests/service.py's
running_service), warms it up, then sends --requests requests from --concurrency client
threads, cycling through the model's sample requests (by default the image files in
MODEL/samples as binData, else MODEL/samples/request.json). Prints Markdown tables: errors
by status, req/s, p50/p99 latency, and the resident memory (RSS) of every process of the
service (supervisor, metrics store, REST arbiter and workers, gRPC, metrics, pycaffe
workers) after the warm-up, half-way and at the end.

    nice .venv/bin/python benchmarks/soak.py [--model examples/vision] [--requests 20000]
        [--concurrency 2] [--transport rest|grpc] [--request FILE]
    nice .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:9000 [--pid SERVICE_PID]

With --url the service is someone else's: RSS is reported only when --pid names its
supervisor process (`seldon-caffe serve`'s pid). With --transport grpc, --url is host:port.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]
from _report import cpu_model  # noqa: E402
from service import (  # noqa: E402
    Service,
    children_map,
    is_pycaffe_worker,
    process_tree,
    running_service,
    strict_json,
)

OK = "OK"  # the outcome of a request answered 200 / gRPC OK with a body that parses
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MIB = 1024.0


# -- requests ---------------------------------------------------------------------------


def sample_requests(model_dir: Path, request_file: Path | None = None) -> list[dict[str, Any]]:
    """Seldon JSON messages to cycle through: --request, else the model's sample images as
    binData, else its samples/request.json."""
    if request_file is not None:
        return [_as_message(request_file)]
    samples = model_dir / "samples"
    images = sorted(p for p in samples.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if samples.is_dir() else []
    if images:
        return [_as_message(p) for p in images]
    if (samples / "request.json").is_file():
        return [_as_message(samples / "request.json")]
    raise SystemExit(f"no sample request in {samples}: pass --request FILE")


def _as_message(path: Path) -> dict[str, Any]:
    """A .json file is a Seldon message; any other file is sent as binData."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return {"binData": base64.b64encode(path.read_bytes()).decode()}


Sender = Callable[[dict[str, Any]], str]


@contextlib.contextmanager
def rest_sender(url: str) -> Iterator[Callable[[], Sender]]:
    """A factory of per-thread senders (one keep-alive session each) for REST at `url`."""
    import requests

    sessions: list[Any] = []

    def make() -> Sender:
        session = requests.Session()
        sessions.append(session)

        def send(message: dict[str, Any]) -> str:
            try:
                response = session.post(f"{url}/api/v1.0/predictions", json=message, timeout=60)
            except requests.RequestException as exc:
                return _no_answer(exc)
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            try:
                strict_json(response.content)
            except ValueError:
                return "HTTP 200, invalid JSON"
            return OK

        return send

    try:
        yield make
    finally:
        for session in sessions:
            session.close()


@contextlib.contextmanager
def grpc_sender(target: str) -> Iterator[Callable[[], Sender]]:
    """A factory of senders sharing one channel (gRPC multiplexes calls over it)."""
    import grpc
    from google.protobuf import json_format
    from seldon_core.proto import prediction_pb2, prediction_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = prediction_pb2_grpc.ModelStub(channel)
    protos: dict[int, Any] = {}

    def make() -> Sender:
        def send(message: dict[str, Any]) -> str:
            proto = protos.get(id(message))
            if proto is None:
                proto = protos[id(message)] = json_format.ParseDict(message, prediction_pb2.SeldonMessage())
            try:
                stub.Predict(proto, timeout=60)
            except grpc.RpcError as exc:
                return f"gRPC {exc.code().name}"
            return OK

        return send

    try:
        yield make
    finally:
        channel.close()


def _no_answer(exc: Exception) -> str:
    """Refused (nothing listens: the request never reached the service, a retry is safe)
    apart from dropped (a connection closed under a request the service may have read)."""
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    if any(word in text for word in ("reset", "aborted", "RemoteDisconnected", "closed")):
        return "connection dropped"
    return type(exc).__name__


# -- load -------------------------------------------------------------------------------


@dataclass
class Record:
    start: float  # time.monotonic()
    end: float
    outcome: str
    client: int


@dataclass
class Load:
    """`clients` threads sending requests back to back until `total` were sent (None: until
    stop()) or `max_seconds` passed. Every request's times and outcome are recorded."""

    make_sender: Callable[[], Sender]
    messages: list[dict[str, Any]]
    clients: int
    total: int | None = None
    max_seconds: float = 3600.0
    backoff_s: float = 0.05  # after a failed request
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tickets = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        self.deadline = 0.0

    def start(self) -> Load:
        self.deadline = time.monotonic() + self.max_seconds
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def done(self) -> int:
        return len(self.records)

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _client(self, index: int) -> None:
        send = self.make_sender()
        messages = itertools.cycle(
            self.messages[index % len(self.messages) :] + self.messages[: index % len(self.messages)]
        )
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            with self._lock:
                if self.total is not None and next(self._tickets) >= self.total:
                    return
            start = time.monotonic()
            outcome = send(next(messages))
            end = time.monotonic()
            with self._lock:
                self.records.append(Record(start, end, outcome, index))
            if outcome != OK:
                self._stop.wait(self.backoff_s)  # do not spin on a closed port


# -- the service's processes ------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    return _proc_kib(f"/proc/{pid}/status", "VmRSS:")


def pss_kib(pid: int) -> int | None:
    """Proportional set size: shared pages divided among their sharers, so the service's
    processes add up to its real footprint (their RSS counts forked pages once per process)."""
    return _proc_kib(f"/proc/{pid}/smaps_rollup", "Pss:")


def _proc_kib(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def listening_ports(pid: int) -> set[int]:
    """TCP ports `pid` holds a listening socket for (gunicorn's workers share their arbiter's)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def label_processes(root: int, port_names: dict[int, str]) -> dict[int, str]:
    """pid -> what it is, from the tree and the ports each process listens on."""
    pids = process_tree(root)
    parent = {child: p for p, kids in children_map().items() for child in kids}
    ports = {pid: listening_ports(pid) for pid in pids}
    labels: dict[int, str] = {}
    counts: Counter[str] = Counter()
    spares = _pycaffe_spares([pid for pid in pids if is_pycaffe_worker(pid)], parent)
    for pid in pids:
        if pid == root:
            name = "supervisor"
        elif is_pycaffe_worker(pid):
            owner = labels.get(parent.get(pid, 0), "?")
            name = f"pycaffe {'spare' if pid in spares else 'worker'} of {owner}"
        elif ports[pid]:
            port = min(ports[pid])
            server = port_names.get(port, f"port {port}")
            shares_parent = port in ports.get(parent.get(pid, 0), set())
            has_workers = any(port in ports.get(c, set()) for c in pids if parent.get(c) == pid)
            name = f"{server} worker" if shares_parent else f"{server} arbiter" if has_workers else server
        elif parent.get(pid) == root:
            name = "metrics store"  # Seldon's multiprocessing manager: no TCP port of its own
        else:
            name = "other"
        counts[name] += 1
        labels[pid] = name if counts[name] == 1 else f"{name} #{counts[name]}"
    return labels


def _pycaffe_spares(workers: list[int], parent: dict[int, int]) -> set[int]:
    """The spare workers: under one owner, every pycaffe worker but the oldest (the one
    serving; a spare is started after it, and when it dies the spare takes over)."""
    by_owner: dict[int, list[int]] = {}
    for pid in workers:
        by_owner.setdefault(parent.get(pid, 0), []).append(pid)
    return {pid for pids in by_owner.values() for pid in sorted(pids, key=_start_ticks)[1:]}


def _start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, in clock ticks


@dataclass
class MemorySample:
    when: str
    rss: dict[int, int | None]
    pss: dict[int, int | None]


def sample_memory(pids: list[int], when: str) -> MemorySample:
    return MemorySample(when, {pid: rss_kib(pid) for pid in pids}, {pid: pss_kib(pid) for pid in pids})


# -- the run ----------------------------------------------------------------------------


def health(url: str) -> str:
    """What /health/status says: the model and the runtime that serves it."""
    import requests

    answer = requests.get(f"{url}/health/status", timeout=10).json()
    answer = answer.get("jsonData", answer)  # Seldon wraps the model's dict
    return f"model {answer.get('model')}, runtime {answer.get('runtime')}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def soak(
    make_sender: Callable[[], Sender],
    messages: list[dict[str, Any]],
    *,
    total: int,
    clients: int,
    warmup: int,
    max_seconds: float,
    service_pid: int | None,
    port_names: dict[int, str],
) -> dict[str, Any]:
    Load(make_sender, messages, clients, total=warmup, max_seconds=max_seconds).start().join()
    labels = label_processes(service_pid, port_names) if service_pid else {}
    pids = list(labels)
    samples = [sample_memory(pids, "start")]
    load = Load(make_sender, messages, clients, total=total, max_seconds=max_seconds)
    started = time.monotonic()
    load.start()
    while load.done() < total // 2 and load.running():
        time.sleep(0.05)
    samples.append(sample_memory(pids, "middle"))
    load.join()
    elapsed = time.monotonic() - started
    samples.append(sample_memory(pids, "end"))
    latencies = [(r.end - r.start) * 1000 for r in load.records]
    return {
        "requests": len(load.records),
        "asked": total,
        "outcomes": Counter(r.outcome for r in load.records),
        "seconds": elapsed,
        "rps": len(load.records) / elapsed,
        "p50_ms": statistics.median(latencies),
        "p99_ms": percentile(latencies, 99),
        "labels": labels,
        "memory": samples,
    }


def markdown(result: dict[str, Any], transport: str, clients: int) -> str:
    errors = {k: v for k, v in result["outcomes"].items() if k != OK}
    error_text = ", ".join(f"{n} x {k}" for k, v in sorted(errors.items()) for n in [v]) or "0"
    lines = [
        "| transport | clients | requests | errors | req/s | p50 ms | p99 ms |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
        f"| {transport} | {clients} | {result['requests']:,} | {error_text} | {result['rps']:.0f} "
        f"| {result['p50_ms']:.2f} | {result['p99_ms']:.2f} |",
    ]
    if result["requests"] < result["asked"]:
        lines.append(f"\nStopped early: {result['requests']:,} of {result['asked']:,} requests sent.")
    labels, memory = result["labels"], result["memory"]
    if labels:
        lines += [
            "",
            "| process | pid | RSS start MiB | middle | end | growth |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        totals = [0, 0, 0]
        for pid, name in labels.items():
            values = [sample.rss.get(pid) for sample in memory]
            if None in values:
                lines.append(
                    f"| {name} | {pid} | "
                    + " | ".join("gone" if v is None else f"{v / MIB:.1f}" for v in values)
                    + " | |"
                )
                continue
            totals = [t + v for t, v in zip(totals, values, strict=True)]
            lines.append(
                f"| {name} | {pid} | " + " | ".join(f"{v / MIB:.1f}" for v in values) + f" | {_growth(values)} |"
            )
        pss = [sum(sample.pss.get(pid) or 0 for pid in labels) for sample in memory]
        for name, row in (("all, RSS summed", totals), ("all, PSS", pss)):
            lines.append(f"| **{name}** | | " + " | ".join(f"{v / MIB:.1f}" for v in row) + f" | **{_growth(row)}** |")
    return "\n".join(lines)


def _growth(values: list[int]) -> str:
    return f"{(values[-1] - values[0]) / values[0] * 100:+.1f}%" if values[0] else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "examples" / "vision", help="model directory to serve")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=2, help="client threads")
    parser.add_argument("--transport", choices=("rest", "grpc"), default="rest")
    parser.add_argument("--request", type=Path, help="a Seldon JSON message, or a file to send as binData")
    parser.add_argument("--warmup", type=int, default=200, help="requests before the first memory sample")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop sending after this long")
    parser.add_argument("--url", help="an already running service (REST: http://host:port; gRPC: host:port)")
    parser.add_argument("--pid", type=int, help="with --url: the service's supervisor pid, for RSS")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `seldon-caffe serve` argument")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be positive")
    if args.url and urlparse(args.url if "//" in args.url else f"//{args.url}").hostname not in (
        "127.0.0.1",
        "localhost",
    ):
        parser.error("--url: only loopback targets (127.0.0.1) are allowed")
    messages = sample_requests(args.model, args.request)
    print(f"soak: {args.requests:,} requests, {args.concurrency} clients, {args.transport}, {args.model.name}")
    with contextlib.ExitStack() as stack:
        if args.url:
            target, service_pid = args.url.rstrip("/"), args.pid
            port = urlparse(target if "//" in target else f"//{target}").port
            port_names = {port: "REST" if args.transport == "rest" else "gRPC"} if port else {}
        else:
            service: Service = stack.enter_context(running_service(args.model.resolve(), *args.serve_arg))
            service_pid = service.process.pid
            port_names = {service.http_port: "REST", service.grpc_port: "gRPC", service.metrics_port: "metrics"}
            target = service.url if args.transport == "rest" else f"127.0.0.1:{service.grpc_port}"
            print(f"served by `seldon-caffe serve`: {health(service.url)}", flush=True)
        sender = rest_sender(target) if args.transport == "rest" else grpc_sender(target)
        make_sender = stack.enter_context(sender)
        result = soak(
            make_sender,
            messages,
            total=args.requests,
            clients=args.concurrency,
            warmup=args.warmup,
            max_seconds=args.max_seconds,
            service_pid=service_pid,
            port_names=port_names,
        )
    print(f"\n{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print(markdown(result, args.transport, args.concurrency))
    return 1 if result["requests"] < args.requests or set(result["outcomes"]) - {OK} else 0


if __name__ == "__main__":
    sys.exit(main())
