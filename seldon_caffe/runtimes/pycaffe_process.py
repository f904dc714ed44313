"""The pycaffe worker process, seen from our side: start it, talk to it, keep it alive.

`pycaffe_worker.py` is the other end, run by whatever interpreter has pycaffe
(`options.pycaffe_command`). One request at a time crosses the pipe. A worker that dies
costs the request in flight a 503 (ModelUnavailable) naming the reason; it is restarted in
the background with the same net bytes and every `set_weights` since load re-applied. A
worker that does not answer within `options.timeout_s` (a hang, a SIGSTOP) costs the
request a 504 (DeadlineExceeded) and is killed and restarted the same way. A worker that
keeps dying as it starts is retried with exponential back-off; requests meanwhile get a
503 saying when the next attempt is, rather than waiting for it.
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
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadRequest, DeadlineExceeded, ModelLoadError, ModelUnavailable, SeldonCaffeError
from ..threads import blas_thread_env
from . import pycaffe_worker as wire

log = logging.getLogger(__name__)

WORKER_SOURCE = Path(wire.__file__).read_text()
_GLOG_PREFIX = re.compile(r"^[FE]\d{4} [\d:.]+ +\d+ [^\]]+\] ")
CLOSE_TIMEOUT_S = 5.0
DEFAULT_TIMEOUT_S = 60.0  # options.timeout_s: one exchange with the worker (a request)
# Starting a worker (interpreter, import caffe, a caffemodel of hundreds of MB on a busy
# machine) may take longer than a request should: it gets at least this long.
START_TIMEOUT_S = 120.0
BACKOFF_FIRST_S = 0.5  # between failed starts: doubled each time, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0
_LIVE_WORKERS: weakref.WeakSet[WorkerProcess] = weakref.WeakSet()


def _raise_reply(header: dict[str, Any], during: str) -> None:
    if header.get("ok"):
        return
    kind = BadRequest if header.get("kind") == "bad_request" else SeldonCaffeError
    raise kind(f"pycaffe ({during}): {header.get('error')}")


class WorkerProcess:
    """A pycaffe worker process and the client end of its pipe.

    One request at a time goes through the pipe (a lock), so `run` from many threads is
    safe; the net itself can only run one batch at a time anyway. Every exchange has a
    deadline (`timeout_s`, or START_TIMEOUT_S or more for a start), kept by a watchdog
    that kills the worker: the blocked read then ends, so no request waits forever.
    """

    def __init__(
        self,
        command: list[str],
        prototxt: bytes,
        weights: bytes,
        threads: int,
        label: str = "model",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        spare: bool = True,
        python_path: Sequence[str] = (),
    ):
        self.command = command
        self.python_path = list(python_path)  # the worker imports Python layers' modules from there
        self.spare = spare  # keep a started worker in reserve (_start)
        self._spare: subprocess.Popen | None = None
        self.label = label
        self.timeout_s = timeout_s
        self._files = [np.frombuffer(prototxt, np.uint8), np.frombuffer(weights, np.uint8)]
        self._env = caffe_env(threads)
        self._lock = threading.Lock()
        self._weights_set: dict[str, list[np.ndarray]] = {}  # re-applied after a restart
        self._proc: subprocess.Popen | None = None
        self._stderr_reader: threading.Thread | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=8)
        self._watchdog = _Watchdog()
        self._owner = os.getpid()
        self._closed = False
        self._closing = threading.Event()  # wakes a restart waiting out its back-off
        self._restarting = False  # a background restart is under way (one at a time)
        self._retry_at = 0.0  # time.monotonic() before which no start is tried
        self._start_error = ""
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.start_failures = 0  # failed starts in a row: what the back-off grows with
        with self._lock:
            try:
                self._start()
            except SeldonCaffeError as exc:
                self._stop()
                self._watchdog.stop()
                raise ModelLoadError(f"the pycaffe worker could not load {label}: {exc}") from None
        _LIVE_WORKERS.add(self)

    @property
    def native(self) -> WorkerProcess:
        """There is no caffe.Net in this process; the worker stands in for it."""
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def spare_pid(self) -> int | None:
        return self._spare.pid if self._spare else None

    def request(self, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
        with self._lock:
            if self._closed:
                raise ModelUnavailable(f"the pycaffe runtime of {self.label} is closed")
            if self._owner != os.getpid():  # a forked child: the parent's worker is not ours
                self._forget_inherited()
            if self._proc is None:
                self._start_for_request()  # the last one died and its restart failed or is not done yet
            reply, results = self._exchange(header, arrays, self.timeout_s)
            _raise_reply(reply, header["op"])
            if header["op"] == "set_weights":
                self._weights_set[header["layer"]] = [a.copy() for a in arrays]
            return results

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._closing.set()
            if self._owner == os.getpid():
                self._stop()
            self._watchdog.stop()

    # -- under the lock ----------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen:
        try:
            return subprocess.Popen(
                [*self.command, "-c", WORKER_SOURCE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                start_new_session=True,  # its own process group: _stop() reaches whatever it spawned
            )
        except OSError as exc:
            raise ModelUnavailable(f"cannot start the pycaffe worker {self.command}: {exc}") from None

    def _start(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            if spare.poll() is None:
                try:
                    self._load(spare)
                    return
                except ModelUnavailable as exc:
                    # The spare was only a head start. It may die unseen while it waits:
                    # killed along with the worker (an OOM kill, a `kill` of the group), and
                    # poll() cannot tell until the kernel has reaped it. Its death is no
                    # reason to back off, so a fresh process gets the net at once.
                    log.warning("the spare pycaffe worker of %s was gone (%s): starting another", self.label, exc)
            _kill_group(spare)
        self._load(self._spawn())

    def _load(self, proc: subprocess.Popen) -> None:
        """Make `proc` the worker: give it the net and every `set_weights` since load."""
        self._proc, self._owner = proc, os.getpid()
        self._stderr_tail.clear()  # a failed start's reason must be its own, not a predecessor's
        self._stderr_reader = threading.Thread(target=self._log_stderr, args=(proc,), daemon=True)
        self._stderr_reader.start()
        timeout = max(self.timeout_s, START_TIMEOUT_S)
        info, _ = self._exchange({"op": "load", "python_path": self.python_path}, self._files, timeout)
        _raise_reply(info, "load")
        for layer, arrays in self._weights_set.items():
            reply, _ = self._exchange({"op": "set_weights", "layer": layer}, arrays, timeout)
            _raise_reply(reply, f"re-applying set_weights({layer!r})")
        self.restarts += bool(self.info)  # (a metric for hooks: 0 until a worker died)
        self.info = info
        log.info("pycaffe worker %d serves %s (%s)", proc.pid, self.label, " ".join(self.command))
        if self.spare:
            # Started ahead of need: by the time this worker dies, the spare has imported
            # caffe (most of a start, 0.3-0.5 s) and waits for its net, so a restart costs
            # only loading the net. It costs an idle interpreter's memory meanwhile.
            with contextlib.suppress(ModelUnavailable):
                self._spare = self._spawn()

    def _start_for_request(self) -> None:
        """Start a worker now, unless failed starts put the next attempt later: then the
        request gets a 503 at once rather than waiting out the back-off."""
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            raise ModelUnavailable(
                f"the pycaffe worker of {self.label} failed to start {self.start_failures} times in a row "
                f"(last: {self._start_error}); next attempt in {wait:.1f} s"
            )
        self._try_start()

    def _try_start(self) -> None:
        """Start a worker after the first; a failure sets the back-off before the next try."""
        try:
            self._start()
        except SeldonCaffeError as exc:
            self._stop()
            self.start_failures += 1
            delay = min(BACKOFF_FIRST_S * 2 ** min(self.start_failures - 1, 16), BACKOFF_MAX_S)
            self._retry_at = time.monotonic() + delay
            self._start_error = str(exc)
            log.error(
                "starting the pycaffe worker of %s failed (%d in a row; next attempt in %.1f s): %s",
                self.label,
                self.start_failures,
                delay,
                exc,
            )
            self._restart_soon()
            raise ModelUnavailable(
                f"the pycaffe worker of {self.label} could not be restarted ({exc}); next attempt in {delay:.1f} s"
            ) from None
        self.start_failures, self._retry_at, self._start_error = 0, 0.0, ""

    def _stop(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            _kill_group(spare)  # it has nothing to say goodbye with: it never loaded a net
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._watchdog.arm(proc, CLOSE_TIMEOUT_S)  # a hung worker would block the goodbye forever
        with contextlib.suppress(OSError, EOFError, ValueError, subprocess.TimeoutExpired):
            wire.write_frame(proc.stdin, {"op": "close"})
            wire.read_frame(proc.stdout)
            proc.wait(timeout=CLOSE_TIMEOUT_S)
        self._watchdog.disarm()
        _kill_group(proc)

    def _forget_inherited(self) -> None:
        for proc in (self._proc, self._spare):
            for stream in (proc.stdin, proc.stdout, proc.stderr) if proc else ():
                with contextlib.suppress(OSError):
                    if stream is not None:  # _spawn pipes all three
                        stream.close()  # our copies only: the parent keeps its workers
        self._proc, self._spare, self._owner = None, None, os.getpid()
        # The parent's threads did not come along: a watchdog and a restarter of our own.
        self._watchdog, self._restarting = _Watchdog(), False

    def _exchange(
        self, header: dict[str, Any], arrays: Sequence[np.ndarray], timeout: float
    ) -> tuple[dict, list[np.ndarray]]:
        proc = self._proc
        assert proc is not None
        self._watchdog.arm(proc, timeout)
        failure: BaseException | None = None
        try:
            wire.write_frame(proc.stdin, header, arrays)
            frame = wire.read_frame(proc.stdout)
            if frame is None:
                failure = EOFError("the worker closed its pipe")
        except (OSError, EOFError, ValueError) as exc:
            frame, failure = None, exc
        if self._watchdog.disarm():  # past the deadline it was killed, whether it answered or not
            self._proc = None
            _kill_group(proc)
            log.error(
                "pycaffe worker %d of %s did not answer %s within %g s: killed",
                proc.pid,
                self.label,
                header["op"],
                timeout,
            )
            if header["op"] == "load":
                raise DeadlineExceeded(f"the pycaffe worker did not load the net within {timeout:g} s") from None
            self._restart_soon()
            raise DeadlineExceeded(
                f"the pycaffe worker did not answer {header['op']} within {timeout:g} s (options.timeout_s); "
                "it was killed and is being restarted, retry the request"
            ) from None
        if failure is not None or frame is None:
            self._proc = None
            reason = self._death_reason(proc, failure)
            _kill_group(proc)
            log.error("pycaffe worker %d of %s died during %s: %s", proc.pid, self.label, header["op"], reason)
            if header["op"] == "load":
                raise ModelUnavailable(f"the pycaffe worker died while loading the net ({reason})") from None
            self._restart_soon()
            raise ModelUnavailable(
                f"the pycaffe worker died during {header['op']} ({reason}); it is being restarted, retry the request"
            ) from None
        return frame

    def _death_reason(self, proc: subprocess.Popen, exc: BaseException | None) -> str:
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
        """Restart the worker in the background, waiting out the back-off of failed starts."""
        if self._restarting or self._closed:
            return
        self._restarting = True
        threading.Thread(target=self._restart_loop, daemon=True, name="pycaffe-restart").start()

    # -- the restart thread ------------------------------------------------------------

    def _restart_loop(self) -> None:
        while True:
            self._closing.wait(max(0.0, self._retry_at - time.monotonic()))
            with self._lock:
                if self._proc is not None or self._closed:  # a request started one, or we are done
                    self._restarting = False
                    return
                if time.monotonic() < self._retry_at:
                    continue  # a request's own attempt failed meanwhile: a new, longer wait
                try:
                    self._try_start()
                except SeldonCaffeError:
                    continue  # logged, and the back-off set, by _try_start
                self._restarting = False
                return

    def _log_stderr(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None  # _spawn pipes it
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self._stderr_tail.append(line)
            log.warning("pycaffe worker %d: %s", proc.pid, line)


class _Watchdog:
    """Kills a worker's process group when an exchange with it outlives its deadline.

    One thread per worker, armed around each exchange (a timer per request would cost a
    thread start each time). Killing and disarming take the same lock, so once `disarm()`
    has said False the watchdog will not touch that worker.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: tuple[subprocess.Popen, float] | None = None
        self._fired = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    def arm(self, proc: subprocess.Popen, seconds: float) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True, name="pycaffe-watchdog")
                self._thread.start()
            self._armed, self._fired = (proc, time.monotonic() + seconds), False
            self._cond.notify()

    def disarm(self) -> bool:
        """Whether the deadline passed (and the worker was killed) since `arm`."""
        with self._cond:
            self._armed = None
            return self._fired

    def stop(self) -> None:
        with self._cond:
            self._stopped, self._armed = True, None
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._armed is None:
                    self._cond.wait()
                    continue
                proc, deadline = self._armed
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._armed, self._fired = None, True
                _kill_group_now(proc)


def _last_words(lines: list[str]) -> str:
    """The line of a dying worker's stderr that says why: glog's fatal or error line
    (without its timestamp prefix) when there is one, else the last real line."""
    for line in reversed(lines):
        if _GLOG_PREFIX.match(line):
            return _GLOG_PREFIX.sub("", line)[:500]
    meaningful = [line for line in lines if line.strip() and not line.startswith("***")]
    return meaningful[-1][:500] if meaningful else ""


def caffe_env(threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment real Caffe runs in, whoever starts it: the pycaffe worker (`base`
    None: this process's environment, which a conda or chroot command may need) and the
    reference oracle (`caffe_oracle.reference.chroot_env`: a clean `base`). One rule for both.

    OPENBLAS_* always come from this process's environment: OPENBLAS_CORETYPE and
    OPENBLAS_L2_SIZE pick OpenBLAS's kernels and blocking, which change a result's last
    bits, and machines set them on purpose (a core type the library cannot detect); the
    oracle must compute as the served worker does. Thread counts are ours (options.threads).
    """
    env = dict(os.environ if base is None else base)
    env.update((name, value) for name, value in os.environ.items() if name.startswith("OPENBLAS_"))
    env.setdefault("GLOG_minloglevel", "2")  # glog's INFO lines (a screen per net load) off
    env.setdefault("GLOG_logtostderr", "1")  # and no log files left inside the chroot
    env.update(blas_thread_env(threads))
    return env


def _kill_group_now(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives a leader that exited; SIGKILL ends a stopped one


def _kill_group(proc: subprocess.Popen) -> None:
    _kill_group_now(proc)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=CLOSE_TIMEOUT_S)
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            if stream is not None:  # _spawn pipes both
                stream.close()


@atexit.register
def _close_all() -> None:
    """No orphans: every worker this process started goes with it."""
    for worker in list(_LIVE_WORKERS):
        worker.close()
