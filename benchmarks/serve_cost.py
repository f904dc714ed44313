"""What `seldon-caffe serve` costs in a venv: processes, PSS and seconds to ready, per protocol,
for one or more checkouts of seldon-caffe run with this interpreter (so that a change's effect
is measured in the same run as its baseline).

    .venv/bin/python benchmarks/serve_cost.py [--rounds 3] [CHECKOUT ...]   # default: this one

A checkout is a directory holding the `seldon_caffe` package (a git worktree of another
commit, say); the service runs from it with `python -m seldon_caffe.cli serve
examples/vision`. Prints a Markdown table of medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from service import Service, free_port, process_tree, stop, wait_ready  # noqa: E402


def pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith("Pss:"))
    return total / 1024


def measure(checkout: Path, protocol: str) -> tuple[int, float, float]:
    ports = [free_port() for _ in range(3)]
    argv = [sys.executable, "-m", "seldon_caffe.cli", "serve", str(REPO / "examples" / "vision")]
    argv += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    argv += ["--protocol", "v2"] if protocol == "v2" else []
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    began = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(argv, cwd=checkout, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    service = Service(process, *ports, log_path=log, protocol=protocol)
    try:
        wait_ready(service, 120)
        ready_s = time.monotonic() - began
        time.sleep(1.0)
        pids = process_tree(process.pid)
        return len(pids), pss_mb(pids), ready_s
    finally:
        stop(service)
        log.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="*", type=Path, default=[REPO])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for _ in range(args.rounds):
        for checkout in args.checkouts:
            for protocol in ("seldon", "v2"):
                results.setdefault((str(checkout), protocol), []).append(measure(checkout, protocol))
    print(f"venv: {sys.prefix}; load average {os.getloadavg()[1]:.1f}; medians of {args.rounds}")
    print("| checkout | protocol | processes | PSS (MB) | ready (s) |")
    print("|---|---|---|---|---|")
    for (checkout, protocol), runs in results.items():
        processes, pss, ready = (statistics.median(column) for column in zip(*runs, strict=True))
        print(f"| {checkout} | {protocol} | {processes:.0f} | {pss:.0f} | {ready:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
