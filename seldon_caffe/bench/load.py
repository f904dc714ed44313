"""The load: client threads spread over several processes, closed loop or fixed arrivals.

Several processes, because one Python process's GIL would cap what its clients can send (and
decoding answers costs CPU): with the load in P processes the server, not the client, is what
is measured. Each process reports every request it finished (when it started, how long it took,
its status) and the CPU time it used, so the report can say what the clients cost; on a small
machine they share the cores with the server.

Closed loop (perf_analyzer's --concurrency-range): each of C clients sends its next request when
the answer to the last one arrives. Open loop (--rate R): requests start at fixed times, R per
second in all, whether or not earlier ones were answered; latency then includes any queueing.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Empty
from typing import Any

from ..errors import SeldonCaffeError
from .clients import Request, make_sender

OPEN_LOOP_THREADS = 64  # requests in flight per process at most, with --rate


@dataclass(frozen=True)
class Plan:
    """One level of load: what to send where, how many clients (or what rate), for how long."""

    protocol: str
    host: str
    port: int
    request: Request
    concurrency: int
    warmup_s: float
    duration_s: float
    rate: float | None = None


@dataclass
class Result:
    """What one level produced: requests finished inside the measured window, and the clients' CPU."""

    plan: Plan
    latencies: list[float] = field(default_factory=list)  # seconds, requests that succeeded
    statuses: dict[int, int] = field(default_factory=dict)  # status -> count, every request
    window_s: float = 0.0
    client_cpu_s: float = 0.0
    partial: bool = False

    @property
    def errors(self) -> dict[int, int]:
        return {status: n for status, n in self.statuses.items() if status != 200}


def processes_for(concurrency: int) -> int:
    return max(1, min(concurrency, os.cpu_count() or 1))


def run_level(plan: Plan, progress: Any = None) -> Result:
    """Run one level of load; `progress(done, errors, elapsed)` is called about once a second.

    KeyboardInterrupt stops the clients at once and returns what the window had so far,
    marked partial.
    """
    context = multiprocessing.get_context("spawn")  # no inherited gRPC or engine state
    count = processes_for(plan.concurrency)
    shares = [plan.concurrency // count + (i < plan.concurrency % count) for i in range(count)]
    stop, done, failed = context.Event(), context.Value("i", 0), context.Value("i", 0)
    sync = (context.Semaphore(0), context.Event(), context.Value("d", 0.0))  # ready, go, start time
    queue = context.Queue()
    workers = [
        context.Process(target=_worker, args=(plan, share, sync, stop, done, failed, queue), daemon=True)
        for share in shares
    ]
    for worker in workers:
        worker.start()
    partial, (ready, go, start_at) = False, sync
    start = time.time()
    window = (start, start)  # nothing measured until the clock starts
    try:
        # The clock starts once every process has its imports and connections: only requests are timed.
        for _ in workers:
            while not ready.acquire(timeout=0.5):
                if not all(w.is_alive() for w in workers):
                    _terminate(workers)
                    raise SeldonCaffeError("a client process died while starting (see its error above)")
        start = start_at.value = time.time() + 0.05
        window = (start + plan.warmup_s, start + plan.warmup_s + plan.duration_s)
        go.set()
        while time.time() < window[1] and all(w.is_alive() for w in workers):
            time.sleep(min(1.0, max(0.05, window[1] - time.time())))
            if progress is not None and time.time() > start:
                progress(done.value, failed.value, time.time() - start)
    except KeyboardInterrupt:
        partial = True
    stop.set()
    go.set()
    reports = []
    for _ in workers:
        try:
            reports.append(queue.get(timeout=30))
        except Empty:  # a client process died: its requests are lost, the others still count
            break
    _terminate(workers)
    result = Result(plan, partial=partial)
    measured_until = min(time.time(), window[1])
    result.window_s = max(0.0, measured_until - window[0])
    for report in reports:
        for began, latency, status in report["requests"]:
            if window[0] <= began + latency <= measured_until:
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 200:
                    result.latencies.append(latency)
        result.client_cpu_s += report["cpu_s"]
    return result


def _terminate(workers: list) -> None:
    for worker in workers:
        worker.join(5)
        if worker.is_alive():
            worker.kill()
            worker.join()


def _worker(plan: Plan, clients: int, sync: tuple, stop: Any, done: Any, failed: Any, queue: Any) -> None:
    """One client process: `clients` closed-loop threads, or this process's share of the rate."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # A client needs Seldon's message classes, not TensorFlow, which seldon-core imports (4 s)
    # whenever it is installed; without it seldon-core uses its own copy of the tensor protos.
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]
    ready, go, start_at = sync
    senders = [make_sender(plan.protocol, plan.host, plan.port, plan.request) for _ in range(clients)]
    records: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def record(began: float, status: int) -> None:
        with lock:
            records.append((began, time.time() - began, status))
        with done.get_lock():
            done.value += 1
        if status != 200:
            with failed.get_lock():
                failed.value += 1

    ready.release()
    go.wait()
    start = start_at.value
    window = (start + plan.warmup_s, start + plan.warmup_s + plan.duration_s)
    cpu = time.process_time()
    time.sleep(max(0.0, start - time.time()))
    if plan.rate is None:
        threads = [threading.Thread(target=_closed_loop, args=(send, window, stop, record)) for send in senders]
    else:
        share = plan.rate * clients / plan.concurrency  # this process's part of the arrivals
        threads = [threading.Thread(target=_open_loop, args=(plan, share, window, stop, record))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.put({"requests": records, "cpu_s": time.process_time() - cpu})


def _closed_loop(send: Any, window: tuple, stop: Any, record: Any) -> None:
    while not stop.is_set() and time.time() < window[1]:
        began = time.time()
        record(began, send())


def _open_loop(plan: Plan, rate: float, window: tuple, stop: Any, record: Any) -> None:
    """Start a request every 1/rate seconds on a pool of senders (one connection per pool thread)."""
    local = threading.local()

    def one(began: float) -> None:
        if not hasattr(local, "send"):
            local.send = make_sender(plan.protocol, plan.host, plan.port, plan.request)
        record(began, local.send())

    with ThreadPoolExecutor(OPEN_LOOP_THREADS) as pool:
        first = time.time()
        for i in range(math.ceil((window[1] - first) * rate)):
            due = first + i / rate
            time.sleep(max(0.0, due - time.time()))
            if stop.is_set():
                break
            pool.submit(one, due)  # latency counts from when it was due: queueing included
