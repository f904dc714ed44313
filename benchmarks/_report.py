"""What every benchmark script shares: the machine's name, and its own section of docs/benchmarks.md.

Each script owns the part of docs/benchmarks.md between its two marker comments, so the
scripts can be rerun one at a time without touching each other's tables.
"""

from __future__ import annotations

import os
import platform
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
    """lscpu's model name: what readers compare their machine with."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown CPU")


def wait_for_quiet(limit_s: float, threshold: float) -> None:
    """Give other jobs on a shared machine a chance to finish: timings under load mislead."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        print(f"load average {os.getloadavg()[0]:.1f} > {threshold}: waiting...", flush=True)
        time.sleep(15)
