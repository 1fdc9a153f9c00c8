"""Rows the applier could not apply yet: retried at the right moments, shown on /health and /metrics.

* Parked rows (a table or column this node lacks) are retried only when the schema changed, per
  table, one chunk per transaction (BatchApplier.start_parked_retry / retry_parked_chunk): the
  shard consumers apply in between, and the write lock is held for one chunk at a time.
* Held rows (a version from beyond replication.max_clock_skew_s) are retried once the clock has
  caught up with them (BatchApplier.retry_held); while any are held the node is unhealthy and
  /health names each origin and how far ahead it is (docs/replication.md, "Clock skew").
"""

from __future__ import annotations

import logging
from typing import Any

from marmot_appliance.node.status import RuntimeStatus
from marmot_appliance.observability.metrics import Metrics

log = logging.getLogger(__name__)


async def retry_parked(apply_db: Any, applier: Any) -> int:
    """Retry parked rows of tables whose schema changed since their last retry, chunk by chunk."""
    if not await apply_db.run(applier.start_parked_retry):
        return 0
    total = 0
    while True:
        retired, done = await apply_db.run(applier.retry_parked_chunk)
        total += retired
        if done:
            break
    if total:
        log.info("applied %d parked row(s) after the schema caught up", total)
    return total


async def retry_held(apply_db: Any, applier: Any) -> int:
    applied = await apply_db.run(applier.retry_held)
    if applied:
        log.info("applied %d held row(s): the clock caught up with their versions", applied)
    return applied


class WaitingRowsReporter:
    """Turns BatchApplier.waiting_report() into status fields and metrics (once a second)."""

    def __init__(self, status: RuntimeStatus, metrics: Metrics, max_clock_skew_s: float):
        self.status = status
        self.metrics = metrics
        self.max_clock_skew_s = max_clock_skew_s
        self._held_origins: set[int] = set()
        self._totals: dict[tuple, int] = {}  # the applier's running totals as last reported

    def _grown(self, key: tuple, total: int) -> int:
        """How much one of the applier's running totals (one applier per runtime, so they only
        grow) grew since the last report: what its counter adds now."""
        last = self._totals.get(key, 0)
        self._totals[key] = total
        return max(0, total - last)

    def publish(self, report: Any) -> None:
        status, metrics = self.status, self.metrics
        status.parked_rows = report.parked_rows
        metrics.set("parked_rows", report.parked_rows)
        metrics.inc("parked_overflow", self._grown(("parked_overflow",), report.park_overflow))
        metrics.inc("parked_retry_rows", self._grown(("parked_retry_rows",), report.retried_rows))
        # Rows set aside one at a time (clock skew, park overflow, refused by SQLite) are dead
        # letters as much as whole messages are (the consumer counts those).
        metrics.inc("dead_letters", self._grown(("dead_letters",), report.dead_lettered_rows))
        held = {
            str(origin): {"rows": rows, "ahead_s": round(ahead, 1)}
            for origin, (rows, ahead) in sorted(report.held_by_origin.items())
        }
        refused = {
            str(origin): {"rows": rows, "max_ahead_s": round(ahead, 1)}
            for origin, (rows, ahead) in sorted(report.skew_dead_letters_by_origin.items())
        }
        status.clock_skew = {"max_clock_skew_s": self.max_clock_skew_s, "held": held, "dead_lettered": refused}
        for origin in set(report.held_by_origin) - self._held_origins:
            rows, ahead = report.held_by_origin[origin]
            log.error(
                "node %d sends versions %.1fs ahead of this node's clock (max_clock_skew_s %g): %d row(s) held "
                "until time catches up; check the clocks (NTP) of both nodes", origin, ahead, self.max_clock_skew_s, rows,
            )
        for origin in self._held_origins - set(report.held_by_origin):
            log.info("node %d: held rows applied, its clock is within the allowed skew again", origin)
            metrics.set("clock_skew_held_rows", 0, origin=str(origin))
        self._held_origins = set(report.held_by_origin)
        for origin, (rows, ahead) in report.held_by_origin.items():
            metrics.set("clock_skew_held_rows", rows, origin=str(origin))
            metrics.set("clock_skew_seconds", round(ahead, 1), origin=str(origin))
        for origin, (rows, ahead) in report.skew_dead_letters_by_origin.items():
            metrics.inc("clock_skew_dead_letters", self._grown(("skew", origin), rows), origin=str(origin))
            if origin not in report.held_by_origin:
                metrics.set("clock_skew_seconds", round(ahead, 1), origin=str(origin))
