"""Change capture on one database: ChangeCapture installs it and reads / retires what it captured.

The parts, each in a module of its own:
  - replication/capture_install.py: the pure-SQL triggers, log tables and layouts (what a
    trigger does per row and why, which tables are skipped), ownership of the change log,
    require_wal / remove_bookkeeping / database_owner;
  - replication/change_log.py: reading log rows (PendingRows) and deleting acknowledged ones.
ChangeCapture holds the connections and what install() found, and drives both. Every name
callers import from here keeps working (re-exported below).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection
from pathlib import Path

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication import change_log
from marmot_appliance.replication.capture_install import (
    CaptureReport,
    NodeIdChangeError,
    active_layout_key,
    database_owner,
    install_capture,
    log_current_rows,
    meta_int,
    node_id_change_message,
    remove_bookkeeping,
    require_wal,
)
from marmot_appliance.replication.change_log import LogLayout, PendingChange, PendingRows
from marmot_appliance.replication.introspect import TableLayout, table_fingerprint
from marmot_appliance.replication.sqlite_util import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DatabaseBusyError,
    connect,
    quote_ident,
    read_transaction,
    schema_version,
    write_transaction,
)
from marmot_appliance.replication.types import DEAD_LETTER_TABLE
from marmot_appliance.spec.model import TableSelection

__all__ = [
    "CaptureReport",
    "ChangeCapture",
    "DatabaseBusyError",
    "NodeIdChangeError",
    "database_owner",
    "node_id_change_message",
    "PendingChange",
    "PendingRows",
    "remove_bookkeeping",
    "require_wal",
    "table_fingerprint",
]


class ChangeCapture:
    """Installs capture on one database and reads / retires what it captured.

    One instance holds one connection; use it from one caller at a time (the async runtime calls
    it through asyncio.to_thread, which is fine as long as calls do not overlap).
    """

    def __init__(
        self,
        db_path: str | Path,
        node_id: int,
        selection: TableSelection | None = None,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        allow_node_id_change: bool = False,
    ):
        self.db_path = Path(db_path)
        self.node_id = int(node_id)
        self.selection = selection or TableSelection()
        self.allow_node_id_change = allow_node_id_change
        self._busy_timeout_ms = busy_timeout_ms
        self._conn = connect(
            self.db_path, busy_timeout_ms=busy_timeout_ms, synchronous_normal=True, cache_mib=32, temp_store_memory=True
        )
        # mark_rows_published may get a connection of its own (use_retire_connection), so a
        # retire waiting for the write lock never holds up the next read.
        self._retire_conn: sqlite3.Connection | None = None
        self._installed_schema_version: int | None = None
        # Clock value at the last moment the schema was seen equal to the installed one: rows
        # with larger versions may have been written under a newer schema (see install()).
        self._schema_seen_clock: int | None = None
        self._layouts: dict[int, LogLayout] = {}
        self._captured: dict[str, TableLayout] = {}
        self._log_table_of: dict[int, str] = {}  # log id -> log table, for mark_published

    # -- installation ------------------------------------------------------------------------

    def install(self) -> CaptureReport:
        """Install (or bring up to date) capture in one BEGIN IMMEDIATE transaction.

        Idempotent: when tables, columns and selection are unchanged, nothing is rewritten.
        New tables get triggers, new columns get log columns (ALTER TABLE ADD COLUMN) and new
        triggers, all atomically, so no application write is ever missed in between.

        Writes made between a schema change and this re-install were captured by the old
        triggers, which do not know the new columns (or, for a new table, did not exist). So,
        except on the very first install (existing data is the snapshot's business):
          - a table captured for the first time has its existing rows logged as new changes
            (rows that came from other nodes, which have a version record, excepted);
          - a table that gained columns has the rows this node wrote since the schema was last
            seen unchanged logged again, now with every column.
        """
        installed = install_capture(
            self._conn,
            db_path=self.db_path,
            node_id=self.node_id,
            selection=self.selection,
            allow_node_id_change=self.allow_node_id_change,
            schema_seen_clock=self._schema_seen_clock,
        )
        self._installed_schema_version = installed.schema_version
        self._schema_seen_clock = installed.clock
        self._captured = installed.captured
        self._layouts = change_log.load_layouts(self._conn)
        return installed.report

    # -- state -------------------------------------------------------------------------------

    def schema_changed(self) -> bool:
        """True when the schema changed since install() (then call install() again)."""
        if self._installed_schema_version is None:
            return True
        with read_transaction(self._conn):
            clock = bk.current_clock(self._conn)
            current = schema_version(self._conn)
        if current != self._installed_schema_version:
            return True
        self._schema_seen_clock = clock
        return False

    def data_version(self) -> int:
        """PRAGMA data_version: changes whenever *another* connection commits (cheap poll)."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def fingerprints(self) -> dict[str, str]:
        return {name: layout.fingerprint for name, layout in self._captured.items()}

    def primary_keys(self) -> dict[str, tuple[str, ...]]:
        return {name: layout.primary_key for name, layout in self._captured.items()}

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(sorted(self._captured))

    def pending_count(self) -> int:
        with read_transaction(self._conn):
            return change_log.count_log_rows(self._conn)

    # -- reading and retiring ------------------------------------------------------------------

    def read_pending(self, limit: int = 1000) -> list[PendingChange]:
        """The oldest `limit` captured changes not yet marked published, in commit (id) order.

        Reads one consistent snapshot; never blocks writers (WAL). (The publisher uses the
        cheaper read_pending_rows(); this gives the same rows as objects.)
        """
        read = self.read_pending_rows(limit)
        log_table_of = self._log_table_of
        for log_name, ids in read.ids_by_log.items():
            for log_id in ids:
                log_table_of[log_id] = log_name
        return read.pending_changes()

    def read_pending_rows(self, limit: int = 1000, after_id: int = 0) -> PendingRows:
        """The oldest `limit` log rows with id > after_id as raw tuples (id, layout, op, c0, ...).

        In id order. One `SELECT *` per log table in one read snapshot; no per-row Python
        objects. Retire what was acknowledged with mark_rows_published(). Never blocks writers
        (WAL). after_id lets a pipelined publisher read past rows it already sent and whose
        acks are pending: log ids come from the clock, which only grows, so every row committed
        after a read has an id above every row that read saw.
        """
        if limit <= 0:
            return PendingRows([], self._layouts, {})
        rows, ids_by_log = change_log.read_log_rows(self._conn, limit, after_id)
        layouts = self._layouts
        if any(layout_id not in layouts for layout_id in change_log.layout_ids(rows)):
            self._layouts = layouts = change_log.load_layouts(self._conn)
        return PendingRows(rows, layouts, ids_by_log, self.node_id)

    def mark_published(self, log_ids: list[int] | tuple[int, ...]) -> int:
        """Retire changes that JetStream acknowledged: fold their versions, delete the log rows.

        Call only after a positive ack. One transaction. Returns how many log rows were removed.
        """
        if not log_ids:
            return 0
        by_table: dict[str | None, list[tuple[int]]] = {}
        for log_id in log_ids:
            by_table.setdefault(self._log_table_of.pop(log_id, None), []).append((log_id,))
        removed = 0
        with write_transaction(self._conn):
            change_log.before_retiring(self._conn, self._installed_schema_version)
            existing = bk.log_tables(self._conn)
            for log_name, ids in by_table.items():
                # Ids read by another instance are not in our map: look in every log table.
                targets = [log_name] if log_name is not None else list(existing)
                for target in targets:
                    if target not in existing:
                        continue
                    removed += change_log.delete_ids(self._conn, target, ids)
        return removed

    def mark_rows_published(self, read: PendingRows, acked: Collection[int] | None = None) -> int:
        """Retire rows of a read_pending_rows() result that JetStream acknowledged.

        acked=None: every row of `read` was acknowledged. Otherwise only the ids in `acked`.
        Rows are deleted by id ranges: each run of consecutive acknowledged rows of one log
        table is one `DELETE ... WHERE id BETWEEN first AND last`. That removes nothing else:
        log ids come from the clock, which only grows, so a row committed after the read has
        an id above every row the read saw. (Should a range ever remove more rows than it
        should, that table falls back to deleting by id.) One transaction; returns rows removed.
        """
        plans = change_log.retire_plans(read, acked)
        if not plans:
            return 0
        conn = self._retire_conn or self._conn
        with write_transaction(conn):
            change_log.before_retiring(conn, self._installed_schema_version)
            return change_log.delete_planned(conn, plans)

    def record_dead_letter(self, stream: str, reason: str) -> None:
        """A captured row this node cannot publish (too large to replicate): say so where an
        operator looks for what did not replicate. The row itself stays in its table here."""
        conn = self._retire_conn or self._conn
        with write_transaction(conn):
            conn.execute(
                f"INSERT INTO {quote_ident(DEAD_LETTER_TABLE)} (stream, seq, reason, payload, received_at) "
                "VALUES (?, NULL, ?, NULL, ?)",
                (stream, reason, time.time()),
            )

    def use_retire_connection(self) -> None:
        """Give mark_rows_published a connection of its own (idempotent).

        Then a read (read_pending_rows) and a retire may run at the same time from two threads:
        a retire waiting for the application's write lock no longer delays the next read.
        """
        if self._retire_conn is None:
            self._retire_conn = connect(
                self.db_path, busy_timeout_ms=self._busy_timeout_ms, synchronous_normal=True, cache_mib=8,
                temp_store_memory=True,
            )

    def purge_published(self) -> int:
        """Housekeeping: drop log tables of tables no longer captured once they are drained.

        Published rows themselves are deleted by mark_published (in the same transaction that
        folds their versions), so nothing published lingers. Returns the number of log tables
        dropped.
        """
        with write_transaction(self._conn):
            return change_log.drop_empty_orphan_logs(self._conn)

    # -- logging rows again ----------------------------------------------------------------------

    def log_unknown_rows(self) -> int:
        """Log every row of the captured tables that no version record knows (rows that were
        there before capture was first installed) as new changes, so they are published.

        For a database that joins a cluster with rows of its own (see the runtime's start-up
        restore). Rows already published or applied have a version record and are skipped.
        Returns the rows logged.
        """
        logged = 0
        with write_transaction(self._conn):
            bk.fold_pending(self._conn)  # rows still pending have versions once folded
            for name, layout in self._captured.items():
                layout_id = meta_int(self._conn, active_layout_key(name))
                if layout_id is not None:
                    logged += log_current_rows(self._conn, layout, layout_id, self.node_id, None)
        return logged

    def relog_own_rows(self) -> int:
        """Log again the newest version of every row this node originated (upserts and
        tombstones), with its original version, so it is published once more.

        After a stream was re-created its old entries are gone, and a node that had not applied
        some of them never will: each node re-publishing what it wrote closes that. Receivers
        compare versions, so rows they have already change nothing. Returns the rows logged.
        """
        logged = 0
        with write_transaction(self._conn):
            bk.fold_pending(self._conn)  # pending rows are in the versions tables (and kept)
            for name, layout in self._captured.items():
                layout_id = meta_int(self._conn, active_layout_key(name))
                if layout_id is None:
                    continue
                logged += self._relog_own(self._conn, layout, layout_id)
        return logged

    def _relog_own(self, conn: sqlite3.Connection, layout: TableLayout, layout_id: int) -> int:
        log_table = quote_ident(bk.log_table_name(layout.name))
        ver = quote_ident(bk.versions_table_name(layout.name))
        keys = [quote_ident(bk.key_column(i)) for i in range(len(layout.primary_key))]
        key_match = " AND ".join(
            f"v.{key} = t.{quote_ident(col)}" for key, col in zip(keys, layout.primary_key)
        )
        all_values = ", ".join(quote_ident(bk.value_column(i)) for i in range(len(layout.columns)))
        row_values = ", ".join(f"t.{quote_ident(col)}" for col in layout.columns)
        upserts = conn.execute(
            f"INSERT OR IGNORE INTO {log_table} (id, layout, op, {all_values}) "
            f"SELECT v.version, ?, {bk.OP_UPSERT}, {row_values} FROM {quote_ident(layout.name)} AS t "
            f"JOIN {ver} AS v ON {key_match} WHERE v.origin = ? AND v.deleted = 0",
            (layout_id, self.node_id),
        ).rowcount
        key_values = ", ".join(quote_ident(bk.value_column(layout.columns.index(col))) for col in layout.primary_key)
        deletes = conn.execute(
            f"INSERT OR IGNORE INTO {log_table} (id, layout, op, {key_values}) "
            f"SELECT v.version, ?, {bk.OP_DELETE}, {', '.join('v.' + key for key in keys)} FROM {ver} AS v "
            "WHERE v.origin = ? AND v.deleted = 1",
            (layout_id, self.node_id),
        ).rowcount
        return max(upserts, 0) + max(deletes, 0)

    def discard_unpublished(self) -> int:
        """For a node that does not publish (`publish: false`): empty the change log.

        Versions are folded first, in the same transaction, so local writes keep taking part in
        last-writer-wins against incoming rows exactly as they did while in the log (the applier
        folds pending rows before comparing). Returns the log rows removed.
        """
        removed = 0
        with write_transaction(self._conn):
            change_log.before_retiring(self._conn, self._installed_schema_version)
            for log_name in bk.log_tables(self._conn):
                removed += max(self._conn.execute(f"DELETE FROM {quote_ident(log_name)}").rowcount, 0)
        return removed

    def close(self) -> None:
        if self._retire_conn is not None:
            self._retire_conn.close()
            self._retire_conn = None
        self._conn.close()

    def __enter__(self) -> ChangeCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
