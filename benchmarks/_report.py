"""What every benchmark script shares: the machine's name, its own section of docs/benchmarks.md,
and the served-load tables' rows (batching.py, protocols.py).

Each script owns the part of docs/benchmarks.md between its two marker comments, so the
scripts can be rerun one at a time without touching each other's tables.
"""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def write_section(section: str, path: Path, markers: tuple[str, str]) -> None:
    """Put `section` between `markers`, leaving the rest of the file alone (append if new)."""
    start, end = markers
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def cpu_model() -> str:
    """The CPU's model, the cores we may use and the flags that decide engine kernels
    (seldon_caffe.cpu): what readers compare their machine with. Statements about the CPU
    in a report come from seldon_caffe.cpu too, never from prose written on another machine."""
    from seldon_caffe import cpu

    return cpu.describe()


def load_sentence() -> str:
    """ "Load average (5 min) at the end: ..." for a report: a busy machine makes every number
    lower, so a shared one is said, with how to read it."""
    load = os.getloadavg()[1]
    shared = " (the machine was shared: read the ratios more than the absolutes)" if load > 1.5 else ""
    return f"Load average (5 min) at the end: {load:.1f} on {os.cpu_count()} cores{shared}."


def caffe_blas() -> str:
    """The OpenBLAS build and kernel real Caffe runs with here (under the environment's
    OPENBLAS_* settings): an OpenBLAS older than the CPU falls back to a slow generic kernel."""
    from caffe_oracle import reference

    code = (
        "import ctypes; lib = ctypes.CDLL('libopenblas.so.0')\n"
        "for f in (lib.openblas_get_corename, lib.openblas_get_config): f.restype = ctypes.c_char_p\n"
        "print(lib.openblas_get_config().decode().split()[1], lib.openblas_get_corename().decode())"
    )
    try:
        done = subprocess.run(
            [*reference.python_command(), "-c", code],
            capture_output=True,
            text=True,
            env=reference.chroot_env(),
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    version, _, core = done.stdout.strip().partition(" ")
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    setting = f"OPENBLAS_CORETYPE={coretype}" if coretype else "OPENBLAS_CORETYPE unset"
    return f"OpenBLAS {version}, {core} kernel ({setting})" if done.returncode == 0 else "unknown"


def median(rows: list[dict], key: str) -> float:
    """The median of `key` over report rows (one per round)."""
    return statistics.median(row[key] for row in rows)


def served_table_lines(
    model: str, rows: dict[tuple, list[dict]], labels: Sequence[str], levels: Sequence[int]
) -> list[str]:
    """One row per label of a served-load table: median req/s, p50 and p99 at each level."""
    lines = []
    for label in labels:
        cells = []
        for level in levels:
            got = rows[(label, level)]
            cells += [f"{median(got, 'req_s'):.1f}", f"{median(got, 'p50'):.1f}", f"{median(got, 'p99'):.1f}"]
        lines.append(f"| {model} | {label} | {' | '.join(cells)} |")
    return lines


def served_measured_line(began: float) -> str:
    """The first line of a served-load section: when, on what, how long, how loaded."""
    return (
        f"Measured {datetime.date.today().isoformat()} on {cpu_model()}, shared by the servers and the clients; "
        f"{(time.monotonic() - began) / 60:.0f} min, load average (5 min) at the end {os.getloadavg()[1]:.1f}."
    )


def wait_for_quiet(limit_s: float, threshold: float) -> None:
    """Give other jobs on a shared machine a chance to finish: timings under load mislead."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        print(f"load average {os.getloadavg()[0]:.1f} > {threshold}: waiting...", flush=True)
        time.sleep(15)
