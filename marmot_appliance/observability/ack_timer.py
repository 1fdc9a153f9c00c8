"""Publish-ack time: from sending a publisher round to JetStream's last acknowledgement of it.

Measured where the acks arrive (a done-callback on each publish future), not where the
publisher's retirer gets to them: rounds are pipelined, so the retirer often reaches a round
long after its acks came in, and timing there would add the wait for the rounds before it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class RoundAckTimer:
    """Observes `publish_ack_seconds` once every future of one round has its ack. A round with
    a failed or cancelled publish is not observed (a timeout says nothing of JetStream's ack
    time; errors are counted elsewhere)."""

    __slots__ = ("_metrics", "_started", "_left")

    def __init__(self, metrics: Any, started: float, futures: list[asyncio.Future]):
        self._metrics = metrics
        self._started = started  # time.monotonic() when the round's first publish went out
        self._left = len(futures)
        for future in futures:
            future.add_done_callback(self._acked)

    def _acked(self, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            self._left = -1  # never reaches 0 again: the round is not observed
            return
        self._left -= 1
        if self._left == 0:
            self._metrics.observe("publish_ack_seconds", time.monotonic() - self._started)
