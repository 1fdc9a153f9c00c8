"""Tombstone collection, the SQLite side: what this node has published, and collecting below a
horizon (docs/capture.md, "Tombstone collection", has the argument why it is safe).

A delete leaves a tombstone in `_marmot_ver_<table>` so a late, older write of the key cannot
bring the row back. Once every version at or below a horizon H has been published by every
node and applied here, no such write can arrive any more except as a duplicate of one already
applied, so the tombstones at or below H can go. What keeps duplicates harmless afterwards is
the horizon itself: it is stored in `_marmot_meta` in the same transaction as the first delete,
and the applier treats every incoming row at or below it as stale (bookkeeping.py,
tombstone_horizon).

The cluster-wide part (who computes H from what) is node/tombstone_collector.py.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.parked_rows import decode_parked_change
from marmot_appliance.replication.sqlite_util import connect, quote_ident, read_transaction, write_transaction
from marmot_appliance.replication.types import BOOKKEEPING_PREFIX, DEAD_LETTER_TABLE

COLLECT_CHUNK_ROWS = 5000  # tombstones deleted per transaction (writers wait at most one chunk)


@dataclass(frozen=True)
class CollectOutcome:
    horizon: int  # the horizon now stored (never lower than before)
    collected: int  # tombstones deleted by this call


def _versions_tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT name FROM main.sqlite_schema WHERE type = 'table' AND name LIKE '\\_marmot\\_ver\\_%' ESCAPE '\\'")
    return [row[0] for row in rows if row[0].startswith(bk.VERSIONS_TABLE_PREFIX)]


def _log_tables(conn: sqlite3.Connection) -> list[str]:
    return list(bk.log_tables(conn))


def stored_horizon(conn: sqlite3.Connection) -> int:
    return bk.tombstone_horizon(conn)


def published_through(db_path: str | Path) -> int:
    """Every change this node originated with a version at or below the result is acknowledged
    by JetStream (no longer in its log), and every later write gets a higher version.

    Read inside a write transaction, so no writer is half-way (a transaction still open would
    have taken its version from an earlier `now` and commit after this read). Every write after
    it takes max(now << 16, clock + 1) (the capture trigger), so an idle node's horizon moves
    with its wall clock, not only with its writes.
    """
    conn = connect(db_path)
    try:
        with write_transaction(conn):
            clock = max(bk.current_clock(conn), (int(time.time() * 1000) << 16) - 1)
            oldest = None
            for log_name in _log_tables(conn):
                row = conn.execute(f"SELECT min(id) FROM {quote_ident(log_name)}").fetchone()
                if row[0] is not None:
                    oldest = int(row[0]) if oldest is None else min(oldest, int(row[0]))
            return clock if oldest is None else min(clock, oldest - 1)
    finally:
        conn.close()


def _waiting_floor(conn: sqlite3.Connection) -> int | None:
    """The oldest version among rows this node received but has not applied yet (parked for a
    table or column it lacks, held for clock skew): they will be applied later, so the horizon
    must stay below them."""
    floor = None
    row = conn.execute(f"SELECT min(version) FROM {quote_ident(bk.HELD_TABLE)}").fetchone()
    if row and row[0] is not None:
        floor = int(row[0])
    for (blob,) in conn.execute(f"SELECT change FROM {quote_ident(bk.PARKED_TABLE)}"):
        try:
            version = int(decode_parked_change(blob).version)
        except Exception:  # noqa: BLE001 - an unreadable parked row is never applied
            continue
        floor = version if floor is None else min(floor, version)
    return floor


def collect_tombstones(db_path: str | Path, horizon: int, chunk_rows: int = COLLECT_CHUNK_ROWS) -> CollectOutcome:
    """Delete the tombstones at or below `horizon` (lowered below any parked or held row).

    The caller guarantees that every change at or below `horizon` was published by every node
    and applied here (node/tombstone_collector.py). The stored horizon only grows and is
    written before any tombstone goes, in the same transaction as the first chunk.
    """
    conn = connect(db_path, synchronous_normal=True)
    collected = 0
    try:
        with write_transaction(conn):
            bk.ensure_bookkeeping(conn)
            floor = _waiting_floor(conn)
            if floor is not None:
                horizon = min(horizon, floor - 1)
            stored = stored_horizon(conn)
            if horizon > stored:
                bk.set_meta(conn, bk.META_TOMBSTONE_HORIZON, horizon)
            horizon = max(horizon, stored)
        for table in _versions_tables(conn):
            while True:
                with write_transaction(conn):
                    cursor = conn.execute(_delete_chunk_sql(conn, table), (horizon, chunk_rows))
                    deleted = max(cursor.rowcount, 0)
                collected += deleted
                if deleted < chunk_rows:
                    break
        return CollectOutcome(horizon=horizon, collected=collected)
    finally:
        conn.close()


def _delete_chunk_sql(conn: sqlite3.Connection, table: str) -> str:
    # Versions tables are WITHOUT ROWID: a chunk is selected by its key columns.
    keys = [row[1] for row in conn.execute(f"PRAGMA main.table_info({quote_ident(table)})")
            if row[1] not in ("version", "origin", "deleted")]
    key_list = ", ".join(quote_ident(key) for key in keys)
    return (
        f"DELETE FROM {quote_ident(table)} WHERE ({key_list}) IN (SELECT {key_list} FROM {quote_ident(table)} "
        "WHERE deleted = 1 AND version <= ?1 LIMIT ?2)"
    )


def unsafe_pending(db_path: str | Path, horizon: int) -> int:
    """Log rows of this node not yet published whose version lies at or below `horizon` (the
    highest horizon any node collected at): published now, they would be stale on the nodes
    that collected and applied on the others. The node must be re-seeded instead."""
    if horizon <= 0:
        return 0
    conn = connect(db_path)
    try:
        with read_transaction(conn):
            return sum(
                int(conn.execute(f"SELECT count(*) FROM {quote_ident(name)} WHERE id <= ?", (horizon,)).fetchone()[0])
                for name in _log_tables(conn)
            )
    finally:
        conn.close()


def set_aside_unsafe_pending(db_path: str | Path, horizon: int, reason: str) -> int:
    """Move the log rows at or below `horizon` into the dead-letter table (kept, with the
    reason; never published). Returns how many rows moved."""
    import json
    import time

    conn = connect(db_path, synchronous_normal=True)
    moved = 0
    try:
        with write_transaction(conn):
            for name in _log_tables(conn):
                columns = [row[1] for row in conn.execute(f"PRAGMA main.table_info({quote_ident(name)})")]
                rows = conn.execute(f"SELECT * FROM {quote_ident(name)} WHERE id <= ?", (horizon,)).fetchall()
                for row in rows:
                    payload = json.dumps(
                        {"table": name[len(bk.LOG_TABLE_PREFIX):], "row": dict(zip(columns, map(repr, row)))}
                    ).encode()
                    conn.execute(
                        f"INSERT INTO {quote_ident(DEAD_LETTER_TABLE)} (stream, seq, reason, payload, received_at) "
                        "VALUES (NULL, NULL, ?, ?, ?)",
                        (reason, payload, time.time()),
                    )
                conn.execute(f"DELETE FROM {quote_ident(name)} WHERE id <= ?", (horizon,))
                moved += len(rows)
        return moved
    finally:
        conn.close()


@dataclass(frozen=True)
class BookkeepingSize:
    rows: dict[str, int]  # bookkeeping table -> rows
    bytes: int | None  # pages of every _marmot_* table and index, when dbstat is available
    tombstones: int
    horizon: int


def bookkeeping_size(db_path: str | Path) -> BookkeepingSize:
    """Rows per `_marmot_*` table, their bytes (SQLite's dbstat table; None where the build
    lacks it), the tombstones kept and the stored horizon."""
    conn = connect(db_path, readonly=True)
    try:
        with read_transaction(conn):
            names = [row[0] for row in conn.execute(
                "SELECT name FROM main.sqlite_schema WHERE type = 'table'") if row[0].startswith(BOOKKEEPING_PREFIX)]
            rows = {name: int(conn.execute(f"SELECT count(*) FROM {quote_ident(name)}").fetchone()[0]) for name in names}
            tombstones = sum(
                int(conn.execute(f"SELECT count(*) FROM {quote_ident(name)} WHERE deleted = 1").fetchone()[0])
                for name in names if name.startswith(bk.VERSIONS_TABLE_PREFIX)
            )
            try:
                size = conn.execute(
                    "SELECT sum(pgsize) FROM dbstat WHERE name IN (SELECT name FROM main.sqlite_schema "
                    "WHERE substr(name, 1, ?) = ? OR substr(tbl_name, 1, ?) = ?)",
                    (len(BOOKKEEPING_PREFIX), BOOKKEEPING_PREFIX, len(BOOKKEEPING_PREFIX), BOOKKEEPING_PREFIX),
                ).fetchone()[0]
                size = int(size or 0)
            except sqlite3.OperationalError:
                size = None  # this SQLite was built without SQLITE_ENABLE_DBSTAT_VTAB
            return BookkeepingSize(rows=rows, bytes=size, tombstones=tombstones, horizon=stored_horizon(conn))
    finally:
        conn.close()
