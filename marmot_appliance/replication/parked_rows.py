"""Parked and held rows: what the applier received but cannot apply yet, and the report of them.

Parked rows wait for a table or column this node lacks (retried when that table's schema
changes); held rows come from further ahead than replication.max_clock_skew_s and wait until the
clock catches up, or are dead-lettered when absurdly far ahead (clock_bound.py). Parked and held
rows together are bounded by replication.max_parked_rows: the overflow is dead-lettered. Each
waiting row is stored as its RowChange in CBOR (encode_parked_change). node/waiting_rows.py
drives the retries and publishes the report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import cbor2

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.apply_transaction import ApplyOutcome, ApplyTransaction, CountKey
from marmot_appliance.replication.clock_bound import ClockLimits
from marmot_appliance.replication.sqlite_util import quote_ident
from marmot_appliance.replication.types import RowChange

# (table, reason, change, stream, seq, parked_at): one row of the parked table.
ParkedEntry = tuple[str, str, bytes, str | None, int | None, float]
# (table, reason, change, stream, seq, held_at, due_at, origin, version): one row of the held table.
HeldEntry = tuple[str, str, bytes, str | None, int | None, float, float, int, int]

PARK_SQL = (
    f"INSERT INTO {quote_ident(bk.PARKED_TABLE)} (tbl, reason, change, stream, seq, parked_at) VALUES (?, ?, ?, ?, ?, ?)"
)
HOLD_SQL = (
    f"INSERT INTO {quote_ident(bk.HELD_TABLE)} (tbl, reason, change, stream, seq, held_at, due_at, origin, version) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def encode_parked_change(change: RowChange) -> bytes:
    return cbor2.dumps(
        [change.table, change.op, list(change.pk), list(change.columns), list(change.values), change.version, change.origin]
    )


def decode_parked_change(blob: bytes) -> RowChange:
    table, op, pk, columns, values, version, origin = cbor2.loads(blob)
    return RowChange(table, op, tuple(pk), tuple(columns), tuple(values), int(version), int(origin))


@dataclass(frozen=True)
class WaitingReport:
    """Rows not applied yet, and what was given up on, for /health, status and metrics."""

    parked_rows: int  # waiting for a table or column (retried when that table's schema changes)
    held_by_origin: dict[int, tuple[int, float]]  # origin -> (held rows, seconds its newest is ahead now)
    skew_dead_letters_by_origin: dict[int, tuple[int, float]]  # origin -> (rows, most seconds ahead seen)
    park_overflow: int  # rows dead-lettered because max_parked_rows was reached (since start)
    retried_rows: int  # parked rows a retry looked at (since start)
    retry_chunks: int  # transactions those retries took (since start)
    dead_lettered_rows: int = 0  # rows this applier set aside one at a time (since start; not whole messages)


class ParkedRows:
    """Stores parked and held rows within max_parked_rows, inside the applier's open transaction."""

    def __init__(self, tx: ApplyTransaction, max_parked_rows: int) -> None:
        self._tx = tx
        self.max_parked_rows = max_parked_rows
        self._count: int | None = None  # parked + held rows; counted once, then kept current
        self._skew_seen: dict[int, float] = {}  # origin -> most seconds ahead among dead-lettered rows

    def forget_count(self) -> None:
        """Count the stored rows again on the next look (a rollback or a restored file)."""
        self._count = None

    def retired(self, rows: int) -> None:
        """`rows` left the parked or held table."""
        if self._count is not None:
            self._count -= rows

    def hold_or_reject(self, row: RowChange, stream: str | None, seq: int | None, held: list[HeldEntry]) -> bool:
        """A row from beyond the allowed clock skew: queue it in `held` (True) or dead-letter it (False)."""
        limits = self._tx.limits
        if not limits.hold_above < row.version <= limits.reject_above:
            ahead = limits.ahead_s(row.version) if 0 <= row.version else 0.0
            reason = limits.reject_reason(row.version, row.origin)
            self._tx.dead_letter_row(stream, seq, encode_parked_change(row), reason)
            self._tx.counts[("skew", row.origin)] += 1
            self._skew_seen[row.origin] = max(self._skew_seen.get(row.origin, 0.0), ahead)
            return False
        held.append((
            row.table, limits.hold_reason(row.version, row.origin), encode_parked_change(row), stream, seq,
            limits.now_s, limits.due_at(row.version), row.origin, row.version,
        ))
        return True

    def count(self) -> int:
        if self._count is None:
            self._count = int(self._tx.conn.execute(
                f"SELECT (SELECT count(*) FROM {quote_ident(bk.PARKED_TABLE)}) "
                f"+ (SELECT count(*) FROM {quote_ident(bk.HELD_TABLE)})"
            ).fetchone()[0])
        return self._count

    def store(self, parked: list[ParkedEntry], held: list[HeldEntry], outcome: ApplyOutcome) -> None:
        """Insert parked and held rows, up to max_parked_rows in all; the overflow is dead-lettered."""
        conn = self._tx.conn
        room = max(0, self.max_parked_rows - self.count())
        overflow = [row for row in (parked + held)[room:]]
        if overflow:
            held = held[: max(0, room - len(parked))]
            parked = parked[:room]
            for table, reason, blob, stream, seq, *_ in overflow:
                self._tx.dead_letter_row(
                    stream, seq, blob,
                    f"parked-row limit reached (replication.max_parked_rows {self.max_parked_rows}): {reason}",
                )
            self._tx.counts[("park_overflow",)] += len(overflow)
            outcome.rows_rejected += len(overflow)
        if parked:
            conn.executemany(PARK_SQL, parked)
        if held:
            conn.executemany(HOLD_SQL, held)
        self._count = self.count() + len(parked) + len(held)
        outcome.rows_parked += len(parked)
        outcome.rows_held += len(held)

    def report(self, totals: Counter[CountKey], now: ClockLimits) -> WaitingReport:
        """The report, read inside the caller's read transaction; `totals`: the applier's counts."""
        waiting = self.count()
        held = {
            int(origin): (int(count), now.ahead_s(int(newest)))
            for origin, count, newest in self._tx.conn.execute(
                f"SELECT origin, count(*), max(version) FROM {quote_ident(bk.HELD_TABLE)} GROUP BY origin"
            )
        }
        return WaitingReport(
            parked_rows=max(0, waiting - sum(count for count, _ in held.values())),
            held_by_origin=held,
            skew_dead_letters_by_origin={
                origin: (totals[("skew", origin)], ahead) for origin, ahead in self._skew_seen.items()
            },
            park_overflow=totals[("park_overflow",)],
            retried_rows=totals["retried_rows"],
            retry_chunks=totals["retry_chunks"],
            dead_lettered_rows=totals["dead_lettered_rows"],
        )
