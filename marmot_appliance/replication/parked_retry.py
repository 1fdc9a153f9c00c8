"""Retry parked and held rows, one chunk of rows per applying transaction.

Parked rows are retried per table, only when its local layout changed since its last retry
(rows for a table whose schema did not change would only be parked again); held rows once the
clock has caught up with them. Each row is checked again, clock first, then schema. The node
runtime drives the retries between applies from the streams (node/waiting_rows.py).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.apply_plan import RowPlanner, TableSignature
from marmot_appliance.replication.apply_rows import RowWriter
from marmot_appliance.replication.apply_transaction import ApplyOutcome, ApplyTransaction
from marmot_appliance.replication.parked_rows import (
    HOLD_SQL,
    PARK_SQL,
    HeldEntry,
    ParkedEntry,
    ParkedRows,
    decode_parked_change,
)
from marmot_appliance.replication.sqlite_util import quote_ident, read_transaction

# (id, change, stream, seq): a row read back from the parked or held table.
WaitingRow = tuple[int, bytes, str | None, int | None]


class ParkedRetry:
    """The retry in progress and what earlier retries saw; writes through the applier's frame.

    `applying` opens one applying transaction (BatchApplier._applying); `finish` closes its
    writes (advances the clock; no positions: retried rows carry none of their own).
    """

    def __init__(
        self,
        tx: ApplyTransaction,
        planner: RowPlanner,
        parked: ParkedRows,
        rows: RowWriter,
        applying: Callable[[], AbstractContextManager[sqlite3.Connection]],
        finish: Callable[[int, dict[str, int]], None],
    ) -> None:
        self._tx = tx
        self._planner = planner
        self._parked = parked
        self._rows = rows
        self._applying = applying
        self._finish = finish
        # table -> its local layout signature at its last retry, and the tables (with the last
        # id visited) a retry in progress still has to go through.
        self._retried: dict[str, TableSignature] = {}
        self._queue: list[tuple[str, TableSignature]] = []
        self._cursor = 0
        self._checked_schema: int | None = None  # schema version the last retry was planned on

    def forget(self) -> None:
        """The file was replaced: its parked rows are not the ones we knew, retry them afresh."""
        self._retried = {}
        self._queue = []
        self._checked_schema = None

    def start(self) -> bool:
        """Queue the tables whose parked rows may apply now; True when there is any.

        A table is queued when its local layout (columns, primary key, selected or not) differs
        from what it was at its last retry, or it was never retried by this process: rows parked
        for a table whose schema did not change would only be parked again. Reads only.
        """
        conn = self._tx.conn
        if self._queue:
            return True  # a retry is under way: finish it first
        with read_transaction(conn):
            self._planner.refresh()
            if self._planner.schema_version == self._checked_schema:
                return False  # no table changed since the last look: nothing can apply now
            tables = [row[0] for row in conn.execute(f"SELECT DISTINCT tbl FROM {quote_ident(bk.PARKED_TABLE)}")]
        self._checked_schema = self._planner.schema_version
        self._queue = [
            (table, signature)
            for table in tables
            if self._retried.get(table) != (signature := self._planner.table_signature(table))
        ]
        self._cursor = 0
        return bool(self._queue)

    def parked_chunk(self, chunk_rows: int) -> tuple[int, bool]:
        """One transaction of the queued retry: (rows that left the park, whether it is done)."""
        if not self._queue:
            return 0, True
        table, signature = self._queue[0]
        with self._applying() as conn:
            rows = conn.execute(
                f"SELECT id, change, stream, seq FROM {quote_ident(bk.PARKED_TABLE)} "
                "WHERE tbl = ? AND id > ? ORDER BY id LIMIT ?",
                (table, self._cursor, chunk_rows),
            ).fetchall()
            retired = self._retry_waiting(rows, held=False)
            self._tx.counts["retried_rows"] += len(rows)
            self._tx.counts["retry_chunks"] += 1
        if len(rows) < chunk_rows:
            self._retried[table] = signature
            self._queue.pop(0)
            self._cursor = 0
        else:
            self._cursor = rows[-1][0]
        return retired, not self._queue

    def held(self, chunk_rows: int) -> int:
        """Apply held rows whose version the clock has caught up with. Returns how many left."""
        total = 0
        after = 0
        due_sql = f"SELECT 1 FROM {quote_ident(bk.HELD_TABLE)} WHERE due_at <= ? AND id > ? LIMIT 1"
        while True:
            # Look first without the write lock: most of the time nothing is due.
            if self._tx.conn.execute(due_sql, (time.time(), after)).fetchone() is None:
                return total
            with self._applying() as conn:
                rows = conn.execute(
                    f"SELECT id, change, stream, seq FROM {quote_ident(bk.HELD_TABLE)} "
                    "WHERE due_at <= ? AND id > ? ORDER BY id LIMIT ?",
                    (self._tx.limits.now_s, after, chunk_rows),
                ).fetchall()
                total += self._retry_waiting(rows, held=True)
            if len(rows) < chunk_rows:
                return total
            after = rows[-1][0]

    def _retry_waiting(self, rows: list[WaitingRow], *, held: bool) -> int:
        """Retry parked (held=False) or held rows inside the open transaction; returns how many left.

        Each row is checked again, clock first, then schema: a parked row from the future moves to
        the held table, a held row whose table or column is missing moves to the park.
        """
        conn = self._tx.conn
        limits = self._tx.limits
        source = bk.HELD_TABLE if held else bk.PARKED_TABLE
        done: list[tuple[int]] = []
        moved_to_park: list[ParkedEntry] = []
        moved_to_held: list[HeldEntry] = []
        newest = 0
        for waiting_id, blob, stream, seq in rows:
            try:
                row = decode_parked_change(blob)
            except Exception as exc:  # noqa: BLE001 - a corrupt entry must not block the rest
                self._tx.dead_letter_row(stream, seq, blob, f"unreadable parked row: {exc}")
                done.append((waiting_id,))
                continue
            plan = self._planner.plan(row)
            if plan.action == "ignore":
                done.append((waiting_id,))
                continue
            if row.version > limits.hold_above:
                if held:
                    conn.execute(f"UPDATE {quote_ident(source)} SET due_at = ? WHERE id = ?",
                                 (limits.due_at(row.version), waiting_id))
                    continue
                done.append((waiting_id,))  # to the held table, or dead-lettered when absurd
                self._parked.hold_or_reject(row, stream, seq, moved_to_held)
                continue
            if plan.action == "park":
                if held:
                    done.append((waiting_id,))
                    moved_to_park.append((row.table, plan.reason, blob, stream, seq, time.time()))
                continue
            done.append((waiting_id,))
            self._rows.apply_one_by_one([(row, plan)], ApplyOutcome(stream=stream or "", seq=seq or 0))
            newest = max(newest, row.version)
        if done:
            conn.executemany(f"DELETE FROM {quote_ident(source)} WHERE id = ?", done)
        if moved_to_park:
            conn.executemany(PARK_SQL, moved_to_park)
        if moved_to_held:
            conn.executemany(HOLD_SQL, moved_to_held)
        left = len(done) - len(moved_to_park) - len(moved_to_held)
        self._parked.retired(left)
        self._finish(newest, {})
        return left
