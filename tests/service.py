"""Start the real microservice (`seldon-caffe serve`) on free ports and talk to it.

Tests use `running_service(model_dir)`; it waits until the health check says the model loaded
(Seldon's /health/status, or /v2/health/ready with `--protocol v2`) and the gRPC and metrics
ports accept connections, and stops the whole process group afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from seldon_caffe.server import service_ready

START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    protocol: str = "seldon"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def post(self, payload: Any, path: str = "/api/v1.0/predictions", **kwargs: Any) -> requests.Response:
        if isinstance(payload, (bytes, str)):
            return requests.post(self.url + path, data=payload, timeout=120, **kwargs)
        return requests.post(self.url + path, json=payload, timeout=120, **kwargs)

    def client(self, transport: str):
        """A SeldonClient talking straight to this microservice over `transport`."""
        from seldon_core.seldon_client import SeldonClient

        port = self.grpc_port if transport == "grpc" else self.http_port
        return SeldonClient(microservice_endpoint=f"127.0.0.1:{port}", transport=transport)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def running_service(
    model_dir: Path,
    *extra_args: str,
    env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT_S,
    verbose: bool = True,
) -> contextlib.AbstractContextManager[Service]:
    return ready_until_stopped(start_service(model_dir, *extra_args, env=env, verbose=verbose), stop, timeout)


@contextlib.contextmanager
def ready_until_stopped[S: Service](service: S, stop_with: Callable[[S], object], timeout: float) -> Iterator[S]:
    """`service` once ready; stopped with `stop_with`, its log removed, however the block ends."""
    try:
        wait_ready(service, timeout)
        yield service
    finally:
        stop_with(service)
        service.log_path.unlink(missing_ok=True)


def start_service(
    model_dir: Path, *extra_args: str, env: dict[str, str] | None = None, verbose: bool = True
) -> Service:
    """`seldon-caffe serve model_dir` on free ports, its output in a log file; not waited for.
    Verbose by default: a failing test shows every process's log."""
    ports = [free_port() for _ in range(3)]
    log = Path(tempfile.mkstemp(prefix="seldon-caffe-service-", suffix=".log")[1])
    argv = [sys.executable, "-m", "seldon_caffe.cli", "serve", str(model_dir)]
    argv += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    argv += ["--verbose"] if verbose else []
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [*argv, *extra_args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # our own process group: stop() reaches gunicorn and gRPC children
        )
    protocol = extra_args[extra_args.index("--protocol") + 1] if "--protocol" in extra_args else "seldon"
    return Service(process, *ports, log_path=log, protocol=protocol)


def strict_json(content: str | bytes) -> Any:
    """JSON as RFC 8259 has it: the NaN/Infinity tokens Python's json writes are a ValueError."""

    def refuse(token: str) -> Any:
        raise ValueError(f"invalid JSON token {token}")

    return json.loads(content, parse_constant=refuse)


def wait_ready(service: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"service exited with {service.process.returncode}:\n{service.log()}")
        if service_ready(service.http_port, [service.grpc_port, service.metrics_port], protocol=service.protocol):
            return
        time.sleep(0.3)
    raise TimeoutError(f"service not ready after {timeout}s:\n{service.log()}")


def stop(service: Service) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.process.pid, signal.SIGTERM)
    try:
        service.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait()


# -- the service's processes (from /proc: the tests and benchmarks look at them) ----------


def children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children, found, todo = children_map(), [root], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def is_pycaffe_worker(pid: int) -> bool:
    """The pycaffe runtime starts its worker as `<python> -c <worker source>`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return len(argv) > 2 and argv[1] == b"-c" and b"The pycaffe worker" in argv[2]
