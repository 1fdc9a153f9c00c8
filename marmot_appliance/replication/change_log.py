"""Reading and retiring the change log that capture's triggers write (replication/capture.py).

Log rows are read as raw tuples (id, layout id, op, c0, c1, ...) in id order, from one read
snapshot, and deleted once JetStream acknowledged them. Log ids come from the hybrid logical
clock, which only grows: every row committed after a read has an id above every row that read
saw, which is what lets a retire delete by id ranges and a pipelined reader read past rows
whose acks are pending (docs/capture.md, "Reading and retiring").
"""

from __future__ import annotations

import bisect
import sqlite3
from collections.abc import Collection
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.sqlite_util import quote_ident, read_transaction, schema_version
from marmot_appliance.replication.types import RowChange

__all__ = ["LogLayout", "PendingChange", "PendingRows"]

LogRow = tuple[Any, ...]  # (id, layout id, op, c0, c1, ...) exactly as SQLite returns it
# log table -> [(first id, last id), ...] ranges to delete, and the ids they are meant to cover
RetirePlan = tuple[str, list[tuple[int, int]], list[int]]

_FIRST = itemgetter(0)
_SECOND = itemgetter(1)


@dataclass(frozen=True)
class PendingChange:
    log_id: int  # the log row's id; equals change.version
    change: RowChange
    fingerprint: str = ""  # fingerprint of the table layout the row was captured with


@dataclass(frozen=True)
class LogLayout:
    """A layout row of _marmot_layouts, with what reading log rows needs precomputed."""

    id: int
    table: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    fingerprint: str
    pk_indexes: tuple[int, ...]


@dataclass
class PendingRows:
    """One read_pending_rows() result: raw log rows, cheap to encode and to retire.

    rows: (id, layout id, op, c0, c1, ...) tuples in id order, straight from SQLite.
    ids_by_log: log table -> the ids read from it, ascending (what mark_rows_published needs).
    """

    rows: list[LogRow]
    layouts: dict[int, LogLayout]
    ids_by_log: dict[str, list[int]]
    node_id: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def merged(cls, reads: list[PendingRows]) -> PendingRows:
        """Several consecutive reads (each above the last id of the one before) as one."""
        rows: list[LogRow] = []
        ids_by_log: dict[str, list[int]] = {}
        layouts: dict[int, LogLayout] = {}
        for read in reads:
            rows.extend(read.rows)
            layouts.update(read.layouts)
            for log_name, ids in read.ids_by_log.items():
                ids_by_log.setdefault(log_name, []).extend(ids)
        return cls(rows, layouts, ids_by_log, reads[-1].node_id if reads else 0)

    def pending_changes(self) -> list[PendingChange]:
        """The rows as PendingChange objects (slower; for callers that want objects)."""
        out: list[PendingChange] = []
        layouts = self.layouts
        node_id = self.node_id
        for row in self.rows:
            log_id, layout_id, op = row[0], row[1], row[2]
            layout = layouts[layout_id]
            if op == bk.OP_UPSERT:
                values = row[3 : 3 + len(layout.columns)]
                pk = tuple([values[i] for i in layout.pk_indexes])
                change = RowChange(layout.table, "upsert", pk, layout.columns, values, log_id, node_id)
            else:
                pk = tuple([row[3 + i] for i in layout.pk_indexes])
                change = RowChange(layout.table, "delete", pk, layout.primary_key, pk, log_id, node_id)
            out.append(PendingChange(log_id, change, layout.fingerprint))
        return out


def load_layouts(conn: sqlite3.Connection) -> dict[int, LogLayout]:
    out = {}
    for layout_id, (table, columns, primary_key, fingerprint) in bk.layouts_by_id(conn).items():
        out[layout_id] = LogLayout(
            id=layout_id,
            table=table,
            columns=columns,
            primary_key=primary_key,
            fingerprint=fingerprint,
            pk_indexes=tuple(columns.index(col) for col in primary_key),
        )
    return out


def count_log_rows(conn: sqlite3.Connection) -> int:
    """Every row in every log table (call inside a transaction for one consistent count)."""
    return sum(
        int(conn.execute(f"SELECT count(*) FROM {quote_ident(name)}").fetchone()[0]) for name in bk.log_tables(conn)
    )


def read_log_rows(conn: sqlite3.Connection, limit: int, after_id: int) -> tuple[list[LogRow], dict[str, list[int]]]:
    """The oldest `limit` log rows with id > after_id across every log table, in id order, and
    the ids taken from each log table (ascending). One `SELECT *` per log table, one snapshot."""
    per_log: dict[str, list[LogRow]] = {}
    with read_transaction(conn):
        for log_name in bk.log_tables(conn):
            rows = conn.execute(
                f"SELECT * FROM {quote_ident(log_name)} WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
            if rows:
                per_log[log_name] = rows
    ids_by_log: dict[str, list[int]]
    if len(per_log) == 1:
        ((log_name, rows),) = per_log.items()
        ids_by_log = {log_name: list(map(_FIRST, rows))}
    else:
        rows = [row for log_rows in per_log.values() for row in log_rows]
        rows.sort(key=_FIRST)
        del rows[limit:]
        cutoff = rows[-1][0] if rows else 0
        ids_by_log = {}
        for log_name, log_rows in per_log.items():
            ids = list(map(_FIRST, log_rows))
            # Each table's rows are a prefix of it in id order: keep those below the cutoff.
            ids = ids[: bisect.bisect_right(ids, cutoff)]
            if ids:
                ids_by_log[log_name] = ids
    return rows, ids_by_log


def layout_ids(rows: list[LogRow]) -> set[int]:
    return set(map(_SECOND, rows))


def retire_plans(read: PendingRows, acked: Collection[int] | None) -> list[RetirePlan]:
    """Per log table: the runs of consecutive acknowledged ids (one ranged DELETE each) and
    the ids chosen. acked=None: every row of `read` was acknowledged."""
    acked_set = None if acked is None else set(acked)
    plans: list[RetirePlan] = []
    for log_name, ids in read.ids_by_log.items():
        runs: list[tuple[int, int]]
        if acked_set is None or acked_set.issuperset(ids):
            runs = [(ids[0], ids[-1])]
            chosen = ids
        else:
            chosen = [log_id for log_id in ids if log_id in acked_set]
            runs = []
            start: int | None = None
            previous = 0
            for log_id in ids:
                if log_id in acked_set:
                    if start is None:
                        start = log_id
                    previous = log_id
                elif start is not None:
                    runs.append((start, previous))
                    start = None
            if start is not None:
                runs.append((start, previous))
        if chosen:
            plans.append((log_name, runs, chosen))
    return plans


def delete_planned(conn: sqlite3.Connection, plans: list[RetirePlan]) -> int:
    """Inside the retiring transaction: delete each plan's runs; returns rows removed.

    Should a range ever remove more rows than it should, that table falls back to deleting by id.
    """
    removed = 0
    existing = bk.log_tables(conn)
    for log_name, runs, chosen in plans:
        if log_name not in existing:
            continue
        conn.execute("SAVEPOINT marmot_retire")
        count = max(conn.executemany(f"DELETE FROM {quote_ident(log_name)} WHERE id BETWEEN ? AND ?", runs).rowcount, 0)
        if count > len(chosen):  # never expected: undo and go id by id
            conn.execute("ROLLBACK TO marmot_retire")
            count = delete_ids(conn, log_name, [(log_id,) for log_id in chosen])
        conn.execute("RELEASE marmot_retire")
        removed += count
    return removed


def delete_ids(conn: sqlite3.Connection, log_name: str, ids: list[tuple[int]]) -> int:
    cursor = conn.executemany(f"DELETE FROM {quote_ident(log_name)} WHERE id = ?", ids)
    return max(cursor.rowcount, 0)


def before_retiring(conn: sqlite3.Connection, installed_schema_version: int | None) -> None:
    """Inside the retiring transaction: versions of every local write first, then the meta."""
    bk.fold_pending(conn)
    if schema_version(conn) == installed_schema_version:
        # Persist the narrowest catch-up window for a restarted runtime (see ChangeCapture.install).
        bk.set_meta(conn, bk.META_SCHEMA_SEEN_CLOCK, bk.current_clock(conn))


def drop_empty_orphan_logs(conn: sqlite3.Connection) -> int:
    """Drop log tables that no trigger writes to any more, once nothing in them awaits publishing.

    Decided from the schema, not from an instance's memory: dropping a log table that a
    trigger still writes to would make every application write on that table fail.
    """
    guarded = {
        tbl_name.lower()
        for name, tbl_name in conn.execute("SELECT name, tbl_name FROM main.sqlite_schema WHERE type = 'trigger'")
        if name.startswith(bk.TRIGGER_PREFIX)
    }
    dropped = 0
    for log_name, table in bk.log_tables(conn).items():
        if table.lower() in guarded:
            continue
        if conn.execute(f"SELECT 1 FROM {quote_ident(log_name)} LIMIT 1").fetchone() is None:
            conn.execute(f"DROP TABLE {quote_ident(log_name)}")
            dropped += 1
    return dropped
