"""Run a shard consumer's database calls until the database accepts them (replication/consumer.py).

Transient and environment errors (replication/consumer_errors.py) are retried with bounded
exponential backoff for as long as they last; while the database cannot be written the stream
shows as blocked on /health. Any other error goes back to the caller, which dead-letters.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, TypeVar

from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication.applier import DatabaseReplacedError
from marmot_appliance.replication.consumer_errors import ConsumerStopping, is_environment, is_transient
from marmot_appliance.replication.db_thread import DbThread
from marmot_appliance.replication.types import ConsumerStatus
from marmot_appliance.retry import backoff_delay, jittered, sleep_or_stop

# The consumer's logger: what an operator filters on stays one name across its modules.
log = logging.getLogger("marmot_appliance.replication.consumer")

T = TypeVar("T")

BACKOFF_INITIAL_S = 0.02
BACKOFF_MAX_S = 5.0
# A lock held this many attempts in a row (several seconds of backoff) counts as blocked too.
BLOCKED_AFTER_ATTEMPTS = 10


def consumer_backoff(attempt: int) -> float:
    """Exponential from BACKOFF_INITIAL_S, capped at BACKOFF_MAX_S, with jitter (50-100 %)."""
    return jittered(backoff_delay(attempt, BACKOFF_INITIAL_S, BACKOFF_MAX_S, max_exponent=10))


class DatabaseRetry:
    """One stream's retrying of calls on its database thread, and its blocked state."""

    def __init__(self, stream: str, db: DbThread, metrics: Metrics, status: ConsumerStatus):
        self.stream = stream
        self.db = db
        self.metrics = metrics
        self.status = status
        self.stop: asyncio.Event | None = None  # set by the consumer's run(): retries end with it

    async def until_accepts(self, what: str, call: Callable[..., T], *args: Any) -> T:
        """Run `call` on the database thread, retrying transient and environment errors for as
        long as they last, with backoff (at most BACKOFF_MAX_S between attempts).

        While the database cannot be written (disk full, I/O error, read-only; or locked for
        several attempts), the stream shows in status.apply_blocked (/health 503) and the gauge
        apply_blocked{stream} is 1; both clear on the next success. Any other error is raised
        for the caller to dead-letter. Raises ConsumerStopping if the node stops meanwhile.
        """
        attempt = 0
        while True:
            try:
                result = await self.db.run(call, *args)
            except DatabaseReplacedError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc):
                    self.unblock()
                    raise
                attempt += 1
                environment = is_environment(exc)
                self.metrics.inc("errors", kind="apply_environment" if environment else "apply_transient")
                if environment or attempt >= BLOCKED_AFTER_ATTEMPTS:
                    self.block(f"{what}: {type(exc).__name__}: {exc}")
                if attempt in (1, 10) or attempt % 50 == 0:
                    log.warning("stream %s %s: the database cannot take it now (%s); retrying", self.stream, what, exc)
                if await sleep_or_stop(self.stop, consumer_backoff(attempt)):
                    raise ConsumerStopping() from exc
                continue
            self.unblock()
            return result

    def block(self, reason: str) -> None:
        if self.stream not in self.status.apply_blocked:
            log.error("stream %s: applying paused until the database can be written: %s", self.stream, reason)
        self.status.apply_blocked[self.stream] = reason
        self.metrics.set("apply_blocked", 1, stream=self.stream)

    def unblock(self) -> None:
        if self.status.apply_blocked.pop(self.stream, None) is not None:
            log.warning("stream %s: the database accepts writes again; applying resumed", self.stream)
            self.metrics.set("apply_blocked", 0, stream=self.stream)
