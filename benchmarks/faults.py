"""Faults under load: what a killed, hung or stopped process costs the clients of a service.

Serves examples/vision with real Caffe in a pycaffe worker (runtime: pycaffe,
options.pycaffe_command = the real-Caffe root's python, options.timeout_s = --timeout-s)
and keeps --clients client threads sending requests back to back, then:

  (a) SIGKILL the pycaffe worker serving the traffic: its request gets a 503, the worker
      is restarted;
  (b) SIGSTOP it: the request in flight waits timeout_s, gets a 504, and the worker is
      killed and restarted;
  (c) SIGTERM the whole service: requests in flight finish, then every process exits.

For (a) and (b): the failed requests (by status), the time from the signal to the first
failure, and from the first failure to the next success (recovery). For (c): the requests
in flight at the signal and how they ended, what the requests sent after it got, and the time
until every process of the service had exited. Each fault is repeated --repeats times
((c) on a fresh service each time); the tables give medians with the range.

    nice .venv/bin/python benchmarks/faults.py [--repeats 5] [--clients 2] [--timeout-s 2]
        [--transport rest|grpc]

Needs real Caffe (`make caffe-env`, root for chroot); without it, it says why and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS.parent / "tests"), str(BENCHMARKS.parent)]  # caffe_oracle/
from service import Service, alive, is_pycaffe_worker, running_service  # noqa: E402
from soak import OK, REPO, Load, Record, grpc_sender, label_processes, rest_sender, sample_requests  # noqa: E402

from caffe_oracle import reference  # noqa: E402

STEADY_S = 2.0  # clean traffic before each fault, and the run of successes that ends one
RECOVERY_LIMIT_S = 60.0  # a fault not recovered from by then is reported as such
EXIT_LIMIT_S = 30.0
STOP_NOTE_S = 5.0  # a stop slower than this keeps the service's own words about it


def pycaffe_model(source: Path, target: Path, timeout_s: float) -> Path:
    """`source` (a Caffe model directory) served by real Caffe in a pycaffe worker."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", ".cache"))
    config = yaml.safe_load((target / "model.yaml").read_text())
    config["runtime"] = "pycaffe"
    options = config.setdefault("options", {}) or {}
    options.update(pycaffe_command=reference.python_command(), timeout_s=timeout_s)
    config["options"] = options
    (target / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return target


@contextlib.contextmanager
def traffic(service: Service, transport: str, clients: int, messages: list[dict[str, Any]]) -> Iterator[Load]:
    target = service.url if transport == "rest" else f"127.0.0.1:{service.grpc_port}"
    sender = rest_sender(target) if transport == "rest" else grpc_sender(target)
    with sender as make_sender:
        load = Load(make_sender, messages, clients, max_seconds=1800).start()
        try:
            yield load
        finally:
            load.stop()


def serving_workers(service: Service, transport: str) -> list[int]:
    """The pycaffe workers below the server that answers `transport` (REST or gRPC)."""
    ports = {service.http_port: "REST", service.grpc_port: "gRPC", service.metrics_port: "metrics"}
    labels = label_processes(service.process.pid, ports)
    server = "REST" if transport == "rest" else "gRPC"
    return [
        pid for pid, name in labels.items() if is_pycaffe_worker(pid) and name.startswith(f"pycaffe worker of {server}")
    ]


def records_since(load: Load, since: float) -> list[Record]:
    return sorted((r for r in list(load.records) if r.end >= since), key=lambda r: r.end)


def wait_steady(load: Load, seconds: float, limit: float = RECOVERY_LIMIT_S) -> bool:
    """Until the last `seconds` of answers were all successes (and there were some)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        now = time.monotonic()
        recent = records_since(load, now - seconds)
        if recent and all(r.outcome == OK for r in recent) and recent[0].start <= now - seconds + 0.5:
            return True
        time.sleep(0.1)
    return False


@dataclass
class WorkerFault:
    failures: Counter[str]
    to_first_failure_s: float | None
    recovery_s: float | None


def worker_fault(service: Service, load: Load, transport: str, signum: signal.Signals) -> WorkerFault:
    """Signal the worker(s) serving the traffic; measure until answers are clean again."""
    if not wait_steady(load, STEADY_S):
        raise RuntimeError(f"no steady traffic before {signum.name}:\n{service.log()[-3000:]}")
    workers = serving_workers(service, transport)
    if not workers:
        raise RuntimeError(f"no pycaffe worker below the {transport} server:\n{service.log()[-3000:]}")
    signalled = time.monotonic()
    for pid in workers:
        os.kill(pid, signum)
    # Done when some failure happened and the answers since the last one have been clean
    # for STEADY_S: the failures counted are all of them, however long recovery took.
    deadline = signalled + RECOVERY_LIMIT_S
    while time.monotonic() < deadline:
        failed = [r for r in records_since(load, signalled) if r.outcome != OK]
        if failed and time.monotonic() - failed[-1].end >= STEADY_S and wait_steady(load, STEADY_S, limit=0.1):
            break
        time.sleep(0.05)
    after = records_since(load, signalled)
    failed = [r for r in after if r.outcome != OK]
    first_failure = failed[0].end if failed else None
    # The next success is one sent after the failed request was: an answer the old worker
    # gave just before the signal can be recorded a moment after the failure (the client
    # threads share one GIL), and is no sign of recovery.
    recovered = next(
        (r.end for r in after if failed and r.end > failed[0].end and r.start > failed[0].start and r.outcome == OK),
        None,
    )
    failures = Counter(r.outcome for r in failed)
    if signum == signal.SIGSTOP:
        for pid in workers:  # normally killed by the watchdog already; never leave one stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return WorkerFault(
        failures,
        None if first_failure is None else first_failure - signalled,
        None if recovered is None or first_failure is None else recovered - first_failure,
    )


@dataclass
class StopFault:
    in_flight: int
    in_flight_outcomes: Counter[str]
    after: Counter[str]
    exit_s: float | None
    exit_code: int | None
    processes: int
    labels: list[str]  # the processes of the service at the signal
    log: list[str]  # what the service logged about stopping, when it did not stop cleanly


def stop_fault(service: Service, load: Load) -> StopFault:
    """SIGTERM the supervisor under traffic; wait until every process of the service is gone."""
    if not wait_steady(load, STEADY_S):
        raise RuntimeError(f"no steady traffic before SIGTERM:\n{service.log()[-3000:]}")
    ports = {service.http_port: "REST", service.grpc_port: "gRPC", service.metrics_port: "metrics"}
    labels = label_processes(service.process.pid, ports)
    processes = list(labels)
    signalled = time.monotonic()
    os.kill(service.process.pid, signal.SIGTERM)
    exited = None
    while time.monotonic() - signalled < EXIT_LIMIT_S:
        if service.process.poll() is not None and not any(alive(pid) for pid in processes):
            exited = time.monotonic()
            break
        time.sleep(0.01)
    load.stop()
    records = list(load.records)  # complete: stop() waited for every client's last request
    before = [r for r in records if r.start < signalled <= r.end]
    after = [r for r in records if r.start >= signalled]
    exit_code = service.process.poll()
    lines = service.log().splitlines()
    slow = exited is None or exited - signalled > STOP_NOTE_S or exit_code != 0
    notes = [line for line in lines if any(word in line for word in ("ERROR", "error:", "killed", "Traceback"))]
    return StopFault(
        in_flight=len(before),
        in_flight_outcomes=Counter(r.outcome for r in before),
        after=Counter(r.outcome for r in after),
        exit_s=None if exited is None else exited - signalled,
        exit_code=exit_code,
        processes=len(processes),
        labels=sorted(labels.values()),
        log=notes if slow else [],
    )


# -- report -----------------------------------------------------------------------------


def spread(values: list[float | None], unit: str = "s", digits: int = 2) -> str:
    """Median (min-max) of the measured values; 'never' counts the runs without one."""
    got = [v for v in values if v is not None]
    missing = len(values) - len(got)
    if not got:
        return "never"
    text = f"{statistics.median(got):.{digits}f} {unit}"
    if len(got) > 1:
        text += f" ({min(got):.{digits}f}-{max(got):.{digits}f})"
    return text + (f", never in {missing}" if missing else "")


def counts(counters: list[Counter[str]]) -> str:
    """Failed requests per run: the median total and each run's statuses."""
    totals = [sum(c.values()) for c in counters]
    runs = "; ".join(", ".join(f"{n} x {k}" for k, n in sorted(c.items())) or "none" for c in counters)
    return f"{statistics.median(totals):g} ({runs})"


def worker_table(results: dict[str, list[WorkerFault]]) -> str:
    lines = [
        "| fault | failed requests per run: median (each run) | signal to first failure "
        "| recovery: first failure to next success |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, runs in results.items():
        lines.append(
            f"| {name} | {counts([r.failures for r in runs])} | {spread([r.to_first_failure_s for r in runs])} "
            f"| {spread([r.recovery_s for r in runs])} |"
        )
    return "\n".join(lines)


def stop_table(runs: list[StopFault]) -> str:
    in_flight = sum(r.in_flight for r in runs)
    in_flight_outcomes = sum((r.in_flight_outcomes for r in runs), Counter())
    done = ", ".join(f"{n} x {k}" for k, n in sorted(in_flight_outcomes.items())) or "none"
    after = "; ".join(", ".join(f"{n} x {k}" for k, n in sorted(r.after.items())) or "none" for r in runs)
    codes = ", ".join(str(r.exit_code) for r in runs)
    return "\n".join(
        [
            "| fault | in flight at the signal (all runs) | how they ended | requests sent after the signal, per run "
            "| time until every process exited | exit status |",
            "| --- | ---: | --- | --- | ---: | --- |",
            f"| SIGTERM the service ({runs[0].processes} processes) | {in_flight} | {done} | {after} "
            f"| {spread([r.exit_s for r in runs])} | {codes} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "examples" / "vision", help="a Caffe model directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=2.0, help="options.timeout_s of the pycaffe runtime")
    parser.add_argument("--transport", choices=("rest", "grpc"), default="rest")
    parser.add_argument("--faults", default="kill,stop,term", help="which of kill, stop, term to run (comma-separated)")
    args = parser.parse_args(argv)
    chosen = set(args.faults.split(","))
    if not chosen or chosen - {"kill", "stop", "term"}:
        parser.error("--faults: a comma-separated subset of kill,stop,term")
    reason = reference.unavailable_reason()
    if reason:
        print(f"faults: skipped: real Caffe is needed for the pycaffe worker, and {reason}")
        return 0
    messages = sample_requests(args.model)
    print(
        f"faults: {args.model.name} on real Caffe (pycaffe worker), {args.clients} {args.transport} clients, ", end=""
    )
    print(f"options.timeout_s {args.timeout_s:g}, {args.repeats} runs of each fault", flush=True)
    signals = {
        "kill": ("SIGKILL the pycaffe worker", signal.SIGKILL),
        "stop": ("SIGSTOP the pycaffe worker", signal.SIGSTOP),
    }
    worker_results: dict[str, list[WorkerFault]] = {signals[k][0]: [] for k in ("kill", "stop") if k in chosen}
    stops: list[StopFault] = []
    total: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="seldon-caffe-faults-") as tmp:
        model_dir = pycaffe_model(args.model, Path(tmp) / args.model.name, args.timeout_s)
        if worker_results:  # (a) and (b) take turns on one service: it must recover from each
            with (
                running_service(model_dir) as service,
                traffic(service, args.transport, args.clients, messages) as load,
            ):
                for i in range(args.repeats):
                    for name, signum in (signals[k] for k in ("kill", "stop") if k in chosen):
                        worker_results[name].append(worker_fault(service, load, args.transport, signum))
                        print(f"  run {i + 1}: {name}: {worker_results[name][-1]}", flush=True)
                total = Counter(r.outcome for r in load.records)
        for i in range(args.repeats if "term" in chosen else 0):  # (c) ends its service: a new one each time
            with (
                running_service(model_dir) as service,
                traffic(service, args.transport, args.clients, messages) as load,
            ):
                stops.append(stop_fault(service, load))
            print(f"  run {i + 1}: SIGTERM: {stops[-1]}", flush=True)
    if worker_results:
        outcomes = ", ".join(f"{n:,} x {k}" for k, n in total.items())
        print(f"\nrequests during (a) and (b): {sum(total.values()):,} ({outcomes})\n")
        print(worker_table(worker_results))
    if stops:
        print()
        print(stop_table(stops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
