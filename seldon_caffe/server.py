"""The serving process: Seldon's REST, gRPC and metrics servers under one supervisor.

`seldon-core-microservice` runs the REST server in its own process and then joins a
non-daemon gRPC child. On SIGTERM, REST stops but the parent and the gRPC child stay up
(answering `Broken pipe`), and a server that cannot bind its port leaves the others running.
A pod in that state is neither serving nor restarted. So here the parent only supervises:

- each server (REST, every gRPC worker, metrics) is a child process in a session of its own,
  so a terminal's Ctrl-C reaches the parent alone, and each dies with the parent
  (PR_SET_PDEATHSIG) even if the parent is SIGKILLed;
- SIGTERM or SIGINT: every child is asked to drain (in-flight requests finish, up to
  DRAIN_S), the parent waits, kills what is left at STOP_S, and exits 0;
- a child that exits on its own (a port it cannot bind, a model that fails to load in a
  worker) takes the whole service down: one line naming the server and its port, exit 1,
  so Kubernetes restarts the pod instead of leaving half a service.

The serving itself is Seldon's: its Flask app, its gRPC servicer and its metrics, so the wire
format is exactly Seldon's. What we add: gunicorn's threaded worker (a slow client holds one
thread, not the whole REST server), one request-size limit for REST and gRPC
(limits.py), gRPC status codes that match the HTTP status, and tracebacks for every 500.
Like model.py, this module knows Seldon; the rest of the package does not.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from .errors import SeldonCaffeError
from .limits import DEFAULT_MAX_REQUEST_BYTES
from .patching import replace
from .seldon_metrics import metrics_store

logger = logging.getLogger("seldon_caffe.server")  # also when run as __main__

LOG_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"
DRAIN_S = 8  # after SIGTERM, in-flight requests have this long to finish
STOP_S = 9.5  # then every process of the service is gone (SIGKILL), well inside 10 s
WORKER_TIMEOUT_S = 120  # gunicorn restarts a REST worker whose main loop is stuck this long
_PR_SET_PDEATHSIG = 1
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@dataclass(frozen=True)
class ServeOptions:
    """What `seldon-caffe serve` (and s2i's run, through it) starts; `main` takes it as JSON."""

    model_dir: Path
    runtime: str | None = None
    protocol: str = "seldon"  # or "v2": MLServer (v2/serve.py) instead of Seldon's servers
    http_port: int = 9000
    grpc_port: int = 5000
    metrics_port: int = 6000
    workers: int = 1  # REST worker processes
    threads: int = 4  # threads per REST worker: one slow client holds one of them
    grpc_workers: int = 1
    grpc_threads: int = 4
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    verbose: bool = False  # Seldon's, Flask's and gunicorn's start-up logs, and each process's own
    # model.yaml's name, as the check-load read it: the V2 supervisor names the model without
    # reading the config (which imports numpy: memory a process that only supervises need not hold)
    model_name: str = ""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "model_dir": str(self.model_dir)})

    @classmethod
    def from_json(cls, text: str) -> ServeOptions:
        values = json.loads(text)
        return cls(**{**values, "model_dir": Path(values["model_dir"])})


@dataclass
class _Child:
    name: str
    port: int
    process: multiprocessing.process.BaseProcess

    def describe(self) -> str:
        return f"the {self.name} server (port {self.port})"

    @property
    def pid(self) -> int:
        """The started process's id (a child is started as soon as it is made)."""
        assert self.process.pid is not None
        return self.process.pid


def main(argv: list[str] | None = None) -> int:
    """`python -m seldon_caffe.server OPTIONS_JSON`: what `seldon-caffe serve` execs into once
    its check-load passed. A fresh interpreter matters: the check-load started the model's
    engine (TensorFlow's and torch's thread pools), and engines do not survive the fork that
    makes each server; this process never starts one."""
    options = ServeOptions.from_json((argv or sys.argv[1:])[0])
    try:
        if options.protocol == "v2":
            from .v2.serve import serve_v2

            return serve_v2(options)
        return serve(options)
    except SeldonCaffeError as error:
        print(f"seldon-caffe: error: {error}", file=sys.stderr)
        return 1


def serve(options: ServeOptions) -> int:
    """Run the service until SIGTERM/SIGINT (exit 0) or until one of its servers dies (1).

    The caller checks the ports first (check_ports), before its model check-load, so that a
    taken port is reported at once.
    """
    configure_logging(options.verbose)
    from gunicorn import util

    from .model import SeldonCaffeModel

    # Checked here, before any server starts (they inherit it through fork): gunicorn's
    # workers look write_error up on every request they refuse.
    replace(util, "write_error", _json_error_page, library="gunicorn")

    # One metrics store for every server (Seldon's: a multiprocessing manager process). It is
    # started with SIGINT/SIGTERM ignored: a terminal's Ctrl-C reaches the whole process group,
    # and the servers' exit hooks still write to it while they drain; it is shut down below.
    with _signals_ignored(signal.SIGINT, signal.SIGTERM):
        metrics = metrics_store()
    user = SeldonCaffeModel(str(options.model_dir), options.runtime)
    fork = multiprocessing.get_context("fork")  # as Seldon does: the children share `metrics`

    def server(name: str, port: int, run: Callable[..., None]) -> _Child:
        return _Child(name, port, fork.Process(target=_child, args=(run, user, metrics, options)))

    children = [server("REST", options.http_port, _run_rest)]
    children += [server("gRPC", options.grpc_port, _run_grpc) for _ in range(options.grpc_workers)]
    children.append(server("metrics", options.metrics_port, _run_metrics))

    stop_signal = StopSignal()
    for child in children:
        # Blocked across the fork: a stop signal in the moment a child starts waits, in the
        # child, until it has reset the handler the fork copied (then it stops it), and, here,
        # until the child exists (then _stop_all reaches it).
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            child.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        logger.debug("%s: pid %d", child.describe(), child.process.pid)
    alive = partial(_all_alive, children)
    threading.Thread(target=announce_ready, args=(options, alive, stop_signal), daemon=True).start()
    try:
        failed = _supervise(children, stop_signal)
    finally:
        _stop_all(children)
        with contextlib.suppress(Exception):
            metrics._manager.shutdown()  # Seldon keeps no public handle on its manager process
    died = None if failed is None else (failed.describe(), failed.process.exitcode or 0)  # it exited: an int
    return service_exit(stop_signal, died)


def service_exit(stop_signal: StopSignal, died: tuple[str, int] | None) -> int:
    """The service's exit status, said on the console: 0 after a stop signal, 1 when one of
    its processes (`died`: what it was, its exit code) ended on its own."""
    if died is not None:
        what, code = died
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        print(f"seldon-caffe: error: {what} {how}; the service stopped", file=sys.stderr, flush=True)
        return 1
    logger.info("stopped on %s", stop_signal.name)
    return 0


def configure_logging(verbose: bool) -> None:
    """Quiet by default: the service's own lines (what it serves, when it is ready, conversions
    cached, every failed request). `verbose` adds Seldon's and Flask's start-up dumps and each
    process's own progress."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("seldon_caffe").setLevel(logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def _signals_ignored(*signums: signal.Signals) -> Any:
    """Processes started inside inherit these signals ignored; this one gets its handlers back."""
    saved = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def service_ready(http_port: int, other_ports: list[int], host: str = "127.0.0.1", protocol: str = "seldon") -> bool:
    """REST says the model is loaded and every other port accepts: the service's own
    announcement, `seldon-caffe bench` and the tests all wait on this."""
    import urllib.request

    base = f"http://{host}:{http_port}"
    try:
        if protocol == "v2":
            # /v2/health/ready is all([]) until MLServer has registered the models it is
            # loading: ready means the repository lists models, each READY.
            headers = {"Content-Type": "application/json"}
            request = urllib.request.Request(f"{base}/v2/repository/index", b"{}", headers, method="POST")
            with urllib.request.urlopen(request, timeout=2) as answer:
                models = json.loads(answer.read())
            if not models or any(model.get("state") != "READY" for model in models):
                return False
        else:
            with urllib.request.urlopen(f"{base}/health/status", timeout=2) as answer:
                answer.read()
        for port in other_ports:  # each server starts on its own: metrics may come up last
            socket.create_connection((host, port), timeout=1).close()
    except (OSError, ValueError):  # not yet (HTTPError, a 503 while loading, is an OSError too)
        return False
    return True


def announce_ready(options: ServeOptions, alive: Callable[[], bool], stop: Any, limit_s: float = 600.0) -> None:
    """One line once the service is ready; nothing once a stop signal came (no polling a
    service that is draining) or its servers stopped being `alive`."""
    deadline = time.monotonic() + limit_s
    others = [options.grpc_port, options.metrics_port]
    protocol = "V2 " if options.protocol == "v2" else ""
    while not stop and time.monotonic() < deadline and alive():
        if service_ready(options.http_port, others, protocol=options.protocol):
            if not stop:
                logger.info("ready: %sREST :%d, gRPC :%d, metrics :%d", protocol, options.http_port, *others)
            return
        time.sleep(0.2)


def _all_alive(children: list[_Child]) -> bool:
    return all(child.process.is_alive() for child in children)


class StopSignal:
    """SIGTERM/SIGINT in the parent: note it; the supervision loop does the rest."""

    def __init__(self) -> None:
        self.name = ""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.name = signal.Signals(signum).name

    def __bool__(self) -> bool:
        return bool(self.name)


def _supervise(children: list[_Child], stop_signal: StopSignal) -> _Child | None:
    """Wait for a stop signal (None) or for a child to exit on its own (that child)."""
    sentinels = {child.process.sentinel: child for child in children}
    while not stop_signal:
        ready: list[Any] = wait(list(sentinels), timeout=0.5)  # of the sentinels given: ints
        if ready and not stop_signal:
            return sentinels[ready[0]]
    return None


def _stop_all(children: list[_Child]) -> None:
    """Ask every child to drain (SIGTERM), then kill whatever is left at STOP_S."""
    deadline = time.monotonic() + STOP_S
    for child in children:
        if child.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
    for child in children:
        child.process.join(max(0.0, deadline - time.monotonic()))
        if child.process.is_alive():
            logger.error("%s did not stop within %.1f s: killed", child.describe(), STOP_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # its session: gunicorn's workers too
            child.process.join(1.0)


def check_ports(options: ServeOptions) -> None:
    """Fail start-up at once, naming the port, when one cannot be bound (gunicorn would retry
    for 5 s, and gRPC, with SO_REUSEPORT, could even share a port with a stale server)."""
    ports = {"REST": options.http_port, "gRPC": options.grpc_port, "metrics": options.metrics_port}
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
            try:
                sock.bind(("0.0.0.0", port))
            except OSError as exc:
                why = "it is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise SeldonCaffeError(f"cannot serve {name} on port {port}: {why}") from None


# -- the children ---------------------------------------------------------------------


def _child(run: Callable[..., None], user: Any, metrics: Any, options: ServeOptions) -> None:
    """Every server's start: its own session (no terminal SIGINT: the parent decides), and
    SIGTERM when the parent dies, however it dies."""
    # The supervisor's handler came along with fork: a SIGTERM before this server installs
    # its own (gunicorn's, our gRPC drain) must stop it, not be noted and lost.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent across the fork
    os.setsid()
    die_with_parent()
    # The parent died before prctl took effect. (Not getppid() == 1: in a container the
    # supervisor itself is PID 1.)
    parent = multiprocessing.parent_process()
    if parent is None or os.getppid() != parent.pid:
        return
    run(user, metrics, options)


def die_with_parent() -> None:
    """SIGTERM this process when its parent dies, however it dies (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _run_rest(user: Any, metrics: Any, options: ServeOptions) -> None:
    from seldon_core import wrapper
    from seldon_core.gunicorn_utils import UserModelApplication, post_worker_init, worker_exit

    from .model import rest_error_response

    app = wrapper.get_rest_microservice(user, metrics)
    app.config["MAX_CONTENT_LENGTH"] = options.max_request_bytes  # werkzeug answers 413 past it
    app.register_error_handler(Exception, partial(rest_error_response, user))  # Seldon's logs no traceback
    settings = {
        "bind": f"0.0.0.0:{options.http_port}",
        "workers": options.workers,
        # gthread: connections wait in a poller and each request gets a thread of its own, so
        # a client trickling its body holds one thread while the others (and /health) answer.
        "worker_class": "gthread",
        "threads": options.threads,
        "timeout": WORKER_TIMEOUT_S,
        "graceful_timeout": DRAIN_S,
        "keepalive": 5,
        "post_worker_init": post_worker_init,
        "worker_exit": partial(worker_exit, seldon_metrics=metrics),
        "loglevel": "warning",
    }
    UserModelApplication(app, user, 0, None, "seldon_caffe.SeldonCaffeModel", options=settings).run()


def _json_error_page(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """gunicorn's answer to a request it refuses before the app sees it (a request line over
    4 KB, too many headers, bytes that are not HTTP): Seldon's JSON error, as every other
    error is, instead of gunicorn's HTML page."""
    from gunicorn import util
    from seldon_core.flask_utils import SeldonMicroserviceException

    error = SeldonMicroserviceException(f"{reason}: {message}", status_code=status)
    body = json.dumps(error.to_dict()).encode()
    head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    util.write_nonblock(sock, f"{head}Content-Length: {len(body)}\r\n\r\n".encode("latin1") + body)


def _run_metrics(_user: Any, metrics: Any, options: ServeOptions) -> None:
    from seldon_core import wrapper
    from seldon_core.gunicorn_utils import StandaloneApplication, post_worker_init

    settings = {
        "bind": f"0.0.0.0:{options.metrics_port}",
        "workers": 1,
        "graceful_timeout": 1,
        "post_worker_init": post_worker_init,
        "loglevel": "warning",
    }
    StandaloneApplication(wrapper.get_metrics_microservice(metrics), options=settings).run()


def _run_grpc(user: Any, metrics: Any, options: ServeOptions) -> None:
    from .grpc_service import grpc_server

    server = grpc_server(user, metrics, options)
    user.load()
    address = f"0.0.0.0:{options.grpc_port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        logger.error("gRPC cannot bind %s", address)
        sys.exit(1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # from now on, SIGTERM drains
    server.start()
    logger.debug("gRPC serving on %s", address)
    while not stop.wait(1.0):
        pass
    server.stop(DRAIN_S).wait()  # refuses new calls, lets in-flight ones finish


if __name__ == "__main__":
    sys.exit(main())
