"""A one-line progress bar for long conversions, drawn on stderr only where someone watches.

Converting a big net takes seconds to minutes; a bar tells a person at a terminal that it
is moving, while logs and pipes (CI, a model server converting on load) stay clean. It is
a dozen lines, so no progress-bar package is needed.
"""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    """`step(label)` once per item; `close()` at the end. Silent unless `enabled`
    (None = only when `stream` is a terminal)."""

    WIDTH = 30

    def __init__(self, total: int, title: str, stream: TextIO, enabled: bool | None = None) -> None:
        self.total, self.title, self.stream = max(total, 1), title, stream
        self.enabled = _is_tty(stream) if enabled is None else enabled
        self.done = 0
        self._last = 0.0

    def step(self, label: str = "") -> None:
        self.done += 1
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.05 or self.done == self.total):
            self._last = now
            filled = self.WIDTH * self.done // self.total
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(f"\r{self.title} [{bar}] {self.done}/{self.total} {label[:40]:<40}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
