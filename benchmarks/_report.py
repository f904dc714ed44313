"""What every benchmark script shares: the machine's name, and its own section of docs/benchmarks.md.

Each script owns the part of docs/benchmarks.md between its two marker comments, so the
scripts can be rerun one at a time without touching each other's tables.
"""

from __future__ import annotations

import os
import subprocess
import time
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


def wait_for_quiet(limit_s: float, threshold: float) -> None:
    """Give other jobs on a shared machine a chance to finish: timings under load mislead."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        print(f"load average {os.getloadavg()[0]:.1f} > {threshold}: waiting...", flush=True)
        time.sleep(15)
