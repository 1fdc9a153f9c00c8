"""What the parts of the applier share while one of its write transactions is open.

BatchApplier (applier.py) opens the transaction and renews the clock limits and the tombstone
horizon at its start; RowWriter (apply_rows.py), ParkedRows (parked_rows.py) and the
UNIQUE-collision settling (unique_collisions.py) write in it and count what they did here. The
counts join the applier's totals only when it commits.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from dataclasses import dataclass

from marmot_appliance.replication.clock_bound import ClockLimits
from marmot_appliance.replication.payload_bounds import bounded_payload
from marmot_appliance.replication.sqlite_util import quote_ident
from marmot_appliance.replication.types import DEAD_LETTER_TABLE

# Event counts: "dead_lettered_rows", "retried_rows", "retry_chunks", ("park_overflow",) and
# ("skew", origin node id).
CountKey = str | tuple[str] | tuple[str, int]

_DEAD_LETTER_SQL = (
    f"INSERT INTO {quote_ident(DEAD_LETTER_TABLE)} (stream, seq, reason, payload, received_at) "
    "VALUES (?, ?, ?, ?, ?)"
)


@dataclass
class ApplyOutcome:
    stream: str
    seq: int
    duplicate: bool = False  # seq at or below the stored position: nothing done
    own_origin: bool = False  # this node's own batch: rows skipped, position advanced
    rows_applied: int = 0  # rows whose version won (including tombstones for absent rows)
    rows_stale: int = 0  # rows an equal or newer version already covered
    rows_parked: int = 0  # rows for a table/column this node lacks, kept for retry_parked()
    rows_held: int = 0  # rows from further ahead than max_clock_skew_s, kept for retry_held()
    rows_ignored: int = 0  # rows for tables not selected on this node
    rows_rejected: int = 0  # rows SQLite refused (constraint errors): dead-lettered one by one
    max_version: int = 0


def record_dead_letter(conn: sqlite3.Connection, stream: str | None, seq: int | None, payload: bytes,
                       reason: str) -> None:
    """Insert one dead letter (inside the caller's transaction)."""
    payload, reason = bounded_payload(payload, reason)
    conn.execute(_DEAD_LETTER_SQL, (stream, seq, reason, payload, time.time()))


class ApplyTransaction:
    """The open applying transaction: its connection, clock limits, tombstone horizon and counts."""

    def __init__(self, conn: sqlite3.Connection, limits: ClockLimits) -> None:
        self.conn = conn
        self.limits = limits  # renewed by the applier as each transaction begins
        self.tombstone_horizon = 0  # read at the start of each transaction (bk.tombstone_horizon)
        self.counts: Counter[CountKey] = Counter()  # this transaction's events, merged on commit

    def dead_letter_row(self, stream: str | None, seq: int | None, payload: bytes, reason: str) -> None:
        """Set one row aside inside the transaction; counted when it commits (the consumer counts
        whole messages it dead-letters, the runtime reports these)."""
        record_dead_letter(self.conn, stream, seq, payload, reason)
        self.counts["dead_lettered_rows"] += 1
