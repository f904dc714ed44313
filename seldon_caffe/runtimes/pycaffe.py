"""The `pycaffe` runtime: real BVLC Caffe, in this process or in a worker process.

In this process when `import caffe` works here. Otherwise pycaffe lives in another
interpreter (Debian's python3-caffe in a chroot, a conda env with Python 3.6...): the
worker (`pycaffe_worker.py`) is started from `options.pycaffe_command` and spoken to over
its stdin/stdout. A worker that dies costs the request in flight a 503 (ModelUnavailable)
naming the reason; it is then restarted in the background with the same net bytes and
every `set_weights` since load re-applied, and the next request is answered normally.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import BadRequest, ModelLoadError, ModelUnavailable, SeldonCaffeError
from . import pycaffe_worker as wire
from .base import Arrays, Runtime, TensorSpec

log = logging.getLogger(__name__)

WORKER_SOURCE = Path(wire.__file__).read_text()
_GLOG_PREFIX = re.compile(r"^[FE]\d{4} [\d:.]+ +\d+ [^\]]+\] ")
CLOSE_TIMEOUT_S = 5.0
_LIVE_WORKERS: weakref.WeakSet[WorkerProcess] = weakref.WeakSet()


class PycaffeRuntime(Runtime):
    name = "pycaffe"

    def __init__(self, config: ModelConfig):
        prototxt = config.files["prototxt"].read_bytes()
        weights = config.files["weights"].read_bytes()
        caffe, why = _import_caffe()
        command = config.options.get("pycaffe_command")
        if caffe is not None:
            self._backend: InProcess | WorkerProcess = InProcess(caffe, prototxt, weights)
        elif command:
            threads = int(config.options.get("threads") or 1)
            self._backend = WorkerProcess(list(command), prototxt, weights, threads, label=config.name)
        else:
            raise ModelLoadError(
                f"{config.source}: runtime pycaffe: `import caffe` fails in this Python ({why}) and "
                'options.pycaffe_command is not set; set it to an interpreter with pycaffe, e.g. ["chroot", '
                'ROOT, "python3"] for the root `make caffe-env` builds, or use runtime: opencv'
            )
        info = self._backend.info
        self.inputs = [_spec(item) for item in info["inputs"]]
        self.outputs = [_spec(item) for item in info["outputs"]]
        self.layer_types: dict[str, str] = dict(info["layers"])
        self.native = self._backend.native

    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        header = {"op": "run", "inputs": list(feed), "outputs": outputs}
        results = self._backend.request(header, list(feed.values()))
        return {name: results[i] for i, name in enumerate(outputs)}

    def get_weights(self, layer: str) -> list[np.ndarray]:
        return self._backend.request({"op": "get_weights", "layer": layer})

    def set_weights(self, layer: str, arrays: Sequence[np.ndarray]) -> None:
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
        self._backend.request({"op": "set_weights", "layer": layer}, arrays)

    def close(self) -> None:
        self._backend.close()


def _spec(item: dict[str, Any]) -> TensorSpec:
    # The batch dimension is free: the net is reshaped to each request's batch.
    shape = tuple(item["shape"])
    return TensorSpec(item["name"], "float32", (-1, *shape[1:]) if shape else shape)


def _import_caffe() -> tuple[Any, str]:
    try:
        return wire.import_caffe(light=False), ""
    except Exception as exc:  # ImportError, or a broken build failing as it loads
        return None, f"{type(exc).__name__}: {exc}"


def _raise_reply(header: dict[str, Any], during: str) -> None:
    if header.get("ok"):
        return
    kind = BadRequest if header.get("kind") == "bad_request" else SeldonCaffeError
    raise kind(f"pycaffe ({during}): {header.get('error')}")


class InProcess:
    """pycaffe imported here: the worker's own NetHandler, called directly under a lock.

    Unlike the worker, a Caffe CHECK failure here aborts the whole process, and OpenBLAS
    keeps the thread count it started with (options.threads cannot change it).
    """

    def __init__(self, caffe: Any, prototxt: bytes, weights: bytes):
        try:
            self._handler = wire.NetHandler(caffe, prototxt, weights)
        except Exception as exc:  # a prototxt that does not parse, a file Caffe's reader rejects
            raise ModelLoadError(f"pycaffe cannot load the net: {type(exc).__name__}: {exc}") from None
        self._lock = threading.Lock()  # one caffe.Net: its blobs are shared state
        self.info = self._handler.describe()
        self.native = self._handler.net

    def request(self, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
        with self._lock:
            try:
                reply, results = self._handler.handle(header, list(arrays))
            except wire.RequestError as exc:
                raise BadRequest(f"pycaffe ({header['op']}): {exc}") from None
            except Exception as exc:  # as the worker reports it: the request fails, the net stays
                raise SeldonCaffeError(f"pycaffe ({header['op']}): {type(exc).__name__}: {exc}") from None
            return [np.array(r, copy=True) for r in results]  # blobs are overwritten by the next run

    def close(self) -> None:
        self._handler = None


class WorkerProcess:
    """A pycaffe worker process and the client end of its pipe.

    One request at a time goes through the pipe (a lock), so `run` from many threads is
    safe; the net itself can only run one batch at a time anyway.
    """

    def __init__(self, command: list[str], prototxt: bytes, weights: bytes, threads: int, label: str = "model"):
        self.command = command
        self.label = label
        self._files = [np.frombuffer(prototxt, np.uint8), np.frombuffer(weights, np.uint8)]
        self._env = _worker_env(threads)
        self._lock = threading.Lock()
        self._weights_set: dict[str, list[np.ndarray]] = {}  # re-applied after a restart
        self._proc: subprocess.Popen | None = None
        self._stderr_reader: threading.Thread | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=8)
        self._owner = os.getpid()
        self._closed = False
        self.info: dict[str, Any] = {}
        self.restarts = 0
        with self._lock:
            try:
                self._start()
            except SeldonCaffeError as exc:
                self._stop()
                raise ModelLoadError(f"the pycaffe worker could not load {label}: {exc}") from None
        _LIVE_WORKERS.add(self)

    @property
    def native(self) -> WorkerProcess:
        """There is no caffe.Net in this process; the worker stands in for it."""
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def request(self, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
        with self._lock:
            if self._closed:
                raise ModelUnavailable(f"the pycaffe runtime of {self.label} is closed")
            if self._owner != os.getpid():  # a forked child: the parent's worker is not ours
                self._forget_inherited()
            if self._proc is None:
                self._start()  # the last one died and its restart failed or is not done yet
            reply, results = self._exchange(header, arrays)
            _raise_reply(reply, header["op"])
            if header["op"] == "set_weights":
                self._weights_set[header["layer"]] = [a.copy() for a in arrays]
            return results

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._owner == os.getpid():
                self._stop()

    # -- under the lock ----------------------------------------------------------------

    def _start(self) -> None:
        try:
            proc = subprocess.Popen(
                [*self.command, "-c", WORKER_SOURCE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                start_new_session=True,  # its own process group: _stop() reaches whatever it spawned
            )
        except OSError as exc:
            raise ModelUnavailable(f"cannot start the pycaffe worker {self.command}: {exc}") from None
        self._proc, self._owner = proc, os.getpid()
        self._stderr_reader = threading.Thread(target=self._log_stderr, args=(proc,), daemon=True)
        self._stderr_reader.start()
        info, _ = self._exchange({"op": "load"}, self._files)
        _raise_reply(info, "load")
        for layer, arrays in self._weights_set.items():
            reply, _ = self._exchange({"op": "set_weights", "layer": layer}, arrays)
            _raise_reply(reply, f"re-applying set_weights({layer!r})")
        self.restarts += bool(self.info)  # (a metric for hooks: 0 until a worker died)
        self.info = info
        log.info("pycaffe worker %d serves %s (%s)", proc.pid, self.label, " ".join(self.command))

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, EOFError, ValueError):
            wire.write_frame(proc.stdin, {"op": "close"})
            wire.read_frame(proc.stdout)
            proc.wait(timeout=CLOSE_TIMEOUT_S)
        _kill_group(proc)

    def _forget_inherited(self) -> None:
        if self._proc is not None:
            for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
                with contextlib.suppress(OSError):
                    stream.close()  # our copies only: the parent keeps its worker
        self._proc, self._owner = None, os.getpid()

    def _exchange(self, header: dict[str, Any], arrays: Sequence[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
        proc = self._proc
        assert proc is not None
        try:
            wire.write_frame(proc.stdin, header, arrays)
            frame = wire.read_frame(proc.stdout)
            if frame is None:
                raise EOFError("the worker closed its pipe")
            return frame
        except (OSError, EOFError, ValueError) as exc:
            self._proc = None
            reason = self._death_reason(proc, exc)
            _kill_group(proc)
            log.error("pycaffe worker %d of %s died during %s: %s", proc.pid, self.label, header["op"], reason)
            if header["op"] == "load":
                raise ModelUnavailable(f"the pycaffe worker died while loading the net ({reason})") from None
            self._restart_soon()
            raise ModelUnavailable(
                f"the pycaffe worker died during {header['op']} ({reason}); it is being restarted, retry the request"
            ) from None

    def _death_reason(self, proc: subprocess.Popen, exc: BaseException) -> str:
        try:
            code = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return f"protocol error: {exc}"
        if self._stderr_reader is not None:
            self._stderr_reader.join(timeout=1)  # its last words are the best reason there is
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        words = _last_words(list(self._stderr_tail))
        return f"{why}: {words}" if words else why

    def _restart_soon(self) -> None:
        def restart() -> None:
            with self._lock:
                if self._proc is not None or self._closed:
                    return
                try:
                    self._start()
                except SeldonCaffeError as exc:  # the next request tries again and reports it
                    log.error("restarting the pycaffe worker of %s failed: %s", self.label, exc)

        threading.Thread(target=restart, daemon=True, name="pycaffe-restart").start()

    def _log_stderr(self, proc: subprocess.Popen) -> None:
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self._stderr_tail.append(line)
            log.warning("pycaffe worker %d: %s", proc.pid, line)


def _last_words(lines: list[str]) -> str:
    """The line of a dying worker's stderr that says why: glog's fatal or error line
    (without its timestamp prefix) when there is one, else the last real line."""
    for line in reversed(lines):
        if _GLOG_PREFIX.match(line):
            return _GLOG_PREFIX.sub("", line)[:500]
    meaningful = [line for line in lines if line.strip() and not line.startswith("***")]
    return meaningful[-1][:500] if meaningful else ""


def _worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GLOG_minloglevel", "2")  # glog's INFO lines (a screen per net load) off
    env.setdefault("GLOG_logtostderr", "1")  # and no log files left inside the chroot
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives a leader that exited
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=CLOSE_TIMEOUT_S)
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            stream.close()


@atexit.register
def _close_all() -> None:
    """No orphans: every worker this process started goes with it."""
    for worker in list(_LIVE_WORKERS):
        worker.close()
