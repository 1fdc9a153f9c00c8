"""Bounded bookkeeping, the SQLite side: how far the change log is behind, and the dead-letter
cap (docs/capture.md, "Bounded bookkeeping").

The change log drains by itself (mark_published deletes what JetStream acknowledged); what it
cannot do is drain while publishing is stopped or slower than the writers. Nothing is dropped
then (the rows are the only copy of those writes): the node raises an alarm instead
(node/backlog_alarm.py). Dead letters are kept for an operator to read; past
`replication.max_dead_letters` the oldest go, counted and logged, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.sqlite_util import connect, quote_ident, read_transaction, write_transaction
from marmot_appliance.replication.types import DEAD_LETTER_TABLE


@dataclass(frozen=True)
class ChangeLogBacklog:
    rows: int  # captured rows not yet acknowledged by JetStream
    oldest_version: int | None  # the oldest such row's version (its id); None when drained

    def oldest_age_s(self, now: float) -> float:
        """Seconds since the oldest pending row was written (its version holds the wall clock
        in milliseconds above 16 bits: docs/capture.md); 0 when the log is drained."""
        if self.oldest_version is None:
            return 0.0
        return max(0.0, now - (self.oldest_version >> 16) / 1000.0)


def change_log_backlog(db_path: str | Path) -> ChangeLogBacklog:
    conn = connect(db_path, readonly=True)
    try:
        with read_transaction(conn):
            rows, oldest = 0, None
            for name in bk.log_tables(conn):
                count, low = conn.execute(f"SELECT count(*), min(id) FROM {quote_ident(name)}").fetchone()
                rows += int(count)
                if low is not None:
                    oldest = int(low) if oldest is None else min(oldest, int(low))
            return ChangeLogBacklog(rows=rows, oldest_version=oldest)
    finally:
        conn.close()


def trim_dead_letters(db_path: str | Path, keep: int) -> int:
    """Delete the oldest dead letters beyond `keep` (by id: the order they were written);
    returns how many went.

    Called every status refresh: the write lock is taken only when there is something to trim."""
    conn = connect(db_path, synchronous_normal=True)
    table = quote_ident(DEAD_LETTER_TABLE)
    try:
        with read_transaction(conn):
            exists = conn.execute("SELECT 1 FROM main.sqlite_schema WHERE type = 'table' AND name = ?",
                                  (DEAD_LETTER_TABLE,)).fetchone()
            if not exists or int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]) <= keep:
                return 0
        with write_transaction(conn):
            count = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            if count <= keep:
                return 0
            cursor = conn.execute(
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT ?)", (count - keep,)
            )
            return max(cursor.rowcount, 0)
    finally:
        conn.close()
