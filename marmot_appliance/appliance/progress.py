"""Terminal progress for long waits: a spinner line on a terminal, nothing otherwise.

Results (the plan, "started node/n1 (pid …)") are output and always printed through `say`;
only the transient "waiting for …" line depends on a terminal, so logs and pipes stay clean.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

FRAMES = "|/-\\"


class Progress:
    def __init__(self, out: TextIO | None = None, status: TextIO | None = None, enabled: bool | None = None):
        self.out = out or sys.stdout
        self.status = status or sys.stderr
        if enabled is None:
            isatty = getattr(self.status, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._frame = 0
        self._shown = False
        self._started = time.monotonic()
        self._message = ""

    def say(self, message: str) -> None:
        """A result line, always printed (the spinner is cleared first)."""
        self.clear()
        print(message, file=self.out, flush=True)

    def waiting(self, message: str) -> None:
        """Update the spinner; call repeatedly while waiting (cheap when disabled)."""
        if not self.enabled:
            return
        if message != self._message:
            self._message = message
            self._started = time.monotonic()
        elapsed = time.monotonic() - self._started
        frame = FRAMES[self._frame % len(FRAMES)]
        self._frame += 1
        self.status.write(f"\r\033[K{frame} {message} ({elapsed:.0f}s)")
        self.status.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.status.write("\r\033[K")
            self.status.flush()
            self._shown = False
