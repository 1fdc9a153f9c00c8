"""Progress of long transfers: a one-line meter on a terminal, silence elsewhere.

Transfers call `progress(done_bytes)`; the meter throttles its own redraws so a fast loop over
small chunks costs next to nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

ProgressCallback = Callable[[int], None]


def no_progress(_done: int) -> None:
    return None


class TerminalProgress:
    """`label  12.3/200.0 MB  6%  45.1 MB/s`, redrawn at most ten times a second."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None):
        self.label = label
        self.total = max(total, 0)
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._done = 0

    def __call__(self, done: int) -> None:
        self._done = done
        now = time.monotonic()
        if now - self._last_draw >= 0.1 or (self.total and done >= self.total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        mb = self._done / 1e6
        elapsed = max(now - self.started, 1e-6)
        rate = mb / elapsed
        if self.total:
            percent = min(100, int(self._done * 100 / self.total))
            text = f"{self.label}  {mb:.1f}/{self.total / 1e6:.1f} MB  {percent}%  {rate:.1f} MB/s"
        else:
            text = f"{self.label}  {mb:.1f} MB  {rate:.1f} MB/s"
        self.stream.write("\r" + text.ljust(70))
        self.stream.flush()

    def finish(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


def finish_progress(progress: ProgressCallback) -> None:
    """End a terminal meter's line (no-op for the silent callback)."""
    if isinstance(progress, TerminalProgress):
        progress.finish()


def progress_for(label: str, total: int, enabled: bool | None = None) -> ProgressCallback:
    """A terminal meter when stderr is a tty (or `enabled`), otherwise a no-op."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return TerminalProgress(label, total) if enabled else no_progress
