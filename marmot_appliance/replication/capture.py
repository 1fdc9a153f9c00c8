"""Change capture: pure-SQL triggers write every committed row change into per-table log tables.

The triggers use nothing but built-in SQL (no application-defined functions), so any client in
any process keeps working, also with `PRAGMA trusted_schema=OFF`, and its writes are captured.
Per captured row a trigger does two things (DESIGN §3: keep the trigger lean):

  1. advance the one-row hybrid logical clock: hlc = max(now_ms << 16, hlc + 1)
  2. insert one log row whose id *is* that clock value (unique, in commit order across tables)

Versions are folded into the versions tables later, in Python, when rows are marked published
(or before the applier compares versions), never per row inside the trigger.

Tables without a primary key are *skipped* with a warning: the only identity such a row has is
its rowid, which VACUUM may renumber and which two nodes allocate independently, so the copies
could never be matched reliably. Tables keyed by an INTEGER PRIMARY KEY (a rowid alias) are
captured with a warning: two nodes inserting concurrently can pick the same id, and then the
newer write wins and the other insert is lost.
"""

from __future__ import annotations

import bisect
import json
import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

from marmot_appliance.errors import DatabaseStateError
from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.introspect import TableLayout, table_fingerprint, table_layout, user_tables
from marmot_appliance.replication.sqlite_util import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DatabaseBusyError,
    connect,
    journal_mode,
    quote_ident,
    read_transaction,
    schema_version,
    write_transaction,
)
from marmot_appliance.replication.types import BOOKKEEPING_PREFIX, DEAD_LETTER_TABLE, RowChange
from marmot_appliance.spec.model import TableSelection

__all__ = [
    "CaptureReport",
    "ChangeCapture",
    "DatabaseBusyError",
    "NodeIdChangeError",
    "database_owner",
    "PendingChange",
    "PendingRows",
    "remove_bookkeeping",
    "require_wal",
    "table_fingerprint",
]

# Built-in SQL only: julianday('now') is stable within one statement step, and `hlc + 1`
# keeps every value unique and increasing even within one millisecond.
_NOW_MS_SQL = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
_ADVANCE_CLOCK_SQL = f"UPDATE {quote_ident(bk.CLOCK_TABLE)} SET hlc = max({_NOW_MS_SQL} << 16, hlc + 1);"
_FIRST = itemgetter(0)
_SECOND = itemgetter(1)
_NOT_APPLYING_SQL = f"NOT EXISTS (SELECT 1 FROM {quote_ident(bk.MARKER_TABLE)})"


@dataclass(frozen=True)
class CaptureReport:
    tables: tuple[str, ...]  # tables whose changes are captured
    warnings: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)  # table -> why it is not captured
    changed: bool = False  # whether install() had to change any trigger or bookkeeping table


@dataclass(frozen=True)
class PendingChange:
    log_id: int  # the log row's id; equals change.version
    change: RowChange
    fingerprint: str = ""  # fingerprint of the table layout the row was captured with


@dataclass
class PendingRows:
    """One read_pending_rows() result: raw log rows, cheap to encode and to retire.

    rows: (id, layout id, op, c0, c1, ...) tuples in id order, straight from SQLite.
    ids_by_log: log table -> the ids read from it, ascending (what mark_rows_published needs).
    """

    rows: list[tuple]
    layouts: dict[int, "_Layout"]
    ids_by_log: dict[str, list[int]]
    node_id: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def merged(cls, reads: list["PendingRows"]) -> "PendingRows":
        """Several consecutive reads (each above the last id of the one before) as one."""
        rows: list[tuple] = []
        ids_by_log: dict[str, list[int]] = {}
        layouts: dict[int, _Layout] = {}
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


@dataclass(frozen=True)
class _Layout:
    """A layout row of _marmot_layouts, with what read_pending needs precomputed."""

    id: int
    table: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    fingerprint: str
    pk_indexes: tuple[int, ...]


def require_wal(db_path: str | Path) -> None:
    """Raise DatabaseStateError unless the database exists and is in WAL journal mode."""
    conn = connect(db_path)
    try:
        mode = journal_mode(conn)
    finally:
        conn.close()
    if mode != "wal":
        raise DatabaseStateError(
            f"database {db_path} uses journal_mode={mode}, but replication needs WAL "
            f"(readers and the replicator must not block each other). Switch it once with: "
            f"sqlite3 {db_path} 'PRAGMA journal_mode=WAL'"
        )


def remove_bookkeeping(db_path: str | Path, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> list[str]:
    """Drop every trigger, log and bookkeeping table capture/apply created; user data untouched.

    Objects are found by an exact prefix compare of their names (never LIKE, whose `_` is a
    wildcard). Runs in one transaction. Returns the names dropped.
    """
    conn = connect(db_path, busy_timeout_ms=busy_timeout_ms)
    try:
        with write_transaction(conn):
            objects = conn.execute("SELECT type, name FROM main.sqlite_schema WHERE type IN ('trigger', 'table')").fetchall()
            ours = [(kind, name) for kind, name in objects if name.startswith(BOOKKEEPING_PREFIX)]
            # Triggers first: dropping a log table a trigger writes to would leave the trigger
            # failing every user write until it is dropped too.
            ours.sort(key=lambda item: item[0] != "trigger")
            for kind, name in ours:
                conn.execute(f"DROP {'TRIGGER' if kind == 'trigger' else 'TABLE'} IF EXISTS {quote_ident(name)}")
        return [name for _kind, name in ours]
    finally:
        conn.close()


class NodeIdChangeError(DatabaseStateError):
    """The database belongs to another node id and the operator did not allow taking it over."""


def node_id_change_message(db_path: str | Path, owner: int, node_id: int, pending: int) -> str:
    return (
        f"database {db_path} belongs to node id {owner} (its change log holds {pending} unpublished "
        f"row(s)), but this node runs as id {node_id}. A node id names one database for its whole "
        f"life: if this is the wrong --node-id or spec entry, fix it. If the database really moves to "
        f"id {node_id}, start once with --allow-node-id-change (its unpublished rows are then "
        f"published under id {node_id}; nothing is discarded)."
    )


def database_owner(db_path: str | Path) -> tuple[int | None, int]:
    """(node id that owns the database's change log, unpublished log rows), read-only.

    (None, 0) for a database capture was never installed on.
    """
    conn = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                           timeout=DEFAULT_BUSY_TIMEOUT_MS / 1000)
    try:
        if not bk.object_exists(conn, bk.META_TABLE):
            return None, 0
        owner = bk.get_meta(conn, bk.META_NODE_ID)
        return (None if owner is None else int(owner)), _count_log_rows(conn)
    finally:
        conn.close()


def _count_log_rows(conn: sqlite3.Connection) -> int:
    return sum(
        int(conn.execute(f"SELECT count(*) FROM {quote_ident(name)}").fetchone()[0]) for name in bk.log_tables(conn)
    )


def _active_layout_key(table: str) -> str:
    return f"active_layout:{table}"


def _trigger_sql(layout: TableLayout, layout_id: int) -> dict[str, str]:
    """CREATE TRIGGER statements for one table, by trigger name."""
    table = quote_ident(layout.name)
    log = quote_ident(bk.log_table_name(layout.name))
    clock_value = f"(SELECT hlc FROM {quote_ident(bk.CLOCK_TABLE)})"

    def log_insert(op: int, image: str, cols: list[str]) -> str:
        targets = ", ".join(["id", "layout", "op"] + [quote_ident(bk.value_column(layout.columns.index(c))) for c in cols])
        values = ", ".join([clock_value, str(layout_id), str(op)] + [f"{image}.{quote_ident(c)}" for c in cols])
        return f"INSERT INTO {log} ({targets}) VALUES ({values});"

    all_columns = list(layout.columns)
    key_columns = list(layout.primary_key)
    # COLLATE BINARY: under a NOCASE key, 'a' -> 'A' is still a key change for the replicas.
    same_key = " AND ".join(f'NEW.{quote_ident(c)} IS OLD.{quote_ident(c)} COLLATE "BINARY"' for c in key_columns)
    upsert_new = log_insert(bk.OP_UPSERT, "NEW", all_columns)
    delete_old = log_insert(bk.OP_DELETE, "OLD", key_columns)

    def trigger(kind: str, event: str, condition: str, body: list[str]) -> tuple[str, str]:
        name = bk.trigger_name(layout.name, kind)
        sql = (
            f"CREATE TRIGGER {quote_ident(name)} AFTER {event} ON {table} FOR EACH ROW "
            f"WHEN {condition} BEGIN " + " ".join(body) + " END"
        )
        return name, sql

    return dict(
        [
            trigger("ins", "INSERT", _NOT_APPLYING_SQL, [_ADVANCE_CLOCK_SQL, upsert_new]),
            trigger("upd", "UPDATE", f"{_NOT_APPLYING_SQL} AND ({same_key})", [_ADVANCE_CLOCK_SQL, upsert_new]),
            # A primary-key change: delete(old key) then upsert(new key), each with its own version.
            trigger(
                "updkey",
                "UPDATE",
                f"{_NOT_APPLYING_SQL} AND NOT ({same_key})",
                [_ADVANCE_CLOCK_SQL, delete_old, _ADVANCE_CLOCK_SQL, upsert_new],
            ),
            trigger("del", "DELETE", _NOT_APPLYING_SQL, [_ADVANCE_CLOCK_SQL, delete_old]),
        ]
    )


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
        self._layouts: dict[int, _Layout] = {}
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
        warnings: list[str] = []
        skipped: dict[str, str] = {}
        captured: dict[str, TableLayout] = {}
        conn = self._conn
        with write_transaction(conn):
            version_before = schema_version(conn)
            bk.ensure_bookkeeping(conn)
            first_install = bk.get_meta(conn, bk.META_SCHEMA_VERSION) is None
            warnings += self._claim_log(conn)
            bk.fold_pending(conn)  # versions of every local write so far, for the re-logging below
            # A marker row can only be committed by a crashed/buggy writer; it would silence capture.
            conn.execute(f"DELETE FROM {quote_ident(bk.MARKER_TABLE)}")
            existing = {
                name: sql
                for name, sql in conn.execute("SELECT name, sql FROM main.sqlite_schema WHERE type = 'trigger'")
                if name.startswith(bk.TRIGGER_PREFIX)
            }

            desired_triggers: dict[str, str] = {}
            catch_up: list[tuple[TableLayout, int, str]] = []  # (layout, layout id, "backfill" | "relog")
            for name in user_tables(conn):
                if not self.selection.selects(name):
                    skipped[name] = "not selected (tables include/exclude)"
                    continue
                layout = table_layout(conn, name)
                if layout is None:
                    continue
                if not layout.primary_key:
                    skipped[name] = "no primary key"
                    warnings.append(
                        f"table {name!r} has no primary key and is not replicated: its rows have no "
                        "identity shared across nodes (rowids are per node and VACUUM renumbers them)"
                    )
                    continue
                if layout.rowid_alias:
                    warnings.append(
                        f"table {name!r} is keyed by INTEGER PRIMARY KEY {layout.primary_key[0]!r} (a rowid "
                        "alias): concurrent inserts on two nodes can pick the same id, and the newer one "
                        "then silently replaces the other; prefer globally unique keys (UUID/ULID)"
                    )
                layout_id = self._layout_id(conn, layout)
                previous_id = bk.get_meta(conn, _active_layout_key(name))
                was_captured = bk.trigger_name(name, "ins") in existing and previous_id is not None
                if not was_captured:
                    if not first_install:
                        catch_up.append((layout, layout_id, "backfill"))
                elif int(previous_id) != layout_id and self._gained_columns(conn, int(previous_id), layout):
                    catch_up.append((layout, layout_id, "relog"))
                self._ensure_log_table(conn, layout)
                bk.ensure_versions_table(conn, layout)
                desired_triggers.update(_trigger_sql(layout, layout_id))
                if previous_id != layout_id:
                    bk.set_meta(conn, _active_layout_key(name), layout_id)
                captured[name] = layout

            for name, sql in existing.items():
                if desired_triggers.get(name) != sql:
                    conn.execute(f"DROP TRIGGER {quote_ident(name)}")
            for name, sql in desired_triggers.items():
                if existing.get(name) != sql:
                    conn.execute(sql)
            since = self._schema_seen_clock
            if since is None:
                since = int(bk.get_meta(conn, bk.META_SCHEMA_SEEN_CLOCK, 0) or 0)
            for layout, layout_id, kind in catch_up:
                self._log_current_rows(conn, layout, layout_id, since if kind == "relog" else None)
            self._drop_empty_orphan_logs(conn)
            installed_version = schema_version(conn)
            changed = installed_version != version_before
            if changed or bk.get_meta(conn, bk.META_SCHEMA_VERSION) != installed_version:
                bk.set_meta(conn, bk.META_SCHEMA_VERSION, installed_version)
            clock = bk.current_clock(conn)
            bk.set_meta(conn, bk.META_SCHEMA_SEEN_CLOCK, clock)
        self._installed_schema_version = installed_version
        self._schema_seen_clock = clock
        self._captured = captured
        self._layouts = self._load_layouts()
        return CaptureReport(tables=tuple(sorted(captured)), warnings=tuple(warnings), skipped=skipped, changed=changed)

    def _gained_columns(self, conn: sqlite3.Connection, previous_id: int, layout: TableLayout) -> bool:
        previous = bk.layouts_by_id(conn).get(previous_id)
        if previous is None:
            return True
        return not set(layout.columns) <= set(previous[1])

    def _log_current_rows(self, conn: sqlite3.Connection, layout: TableLayout, layout_id: int, since: int | None) -> int:
        """Log the current state of rows as fresh upserts (new versions from the clock).

        since=None: every row without a version record (a newly captured table; rows applied
        from other nodes have records). since=N: rows whose newest version is this node's own
        write after clock value N (re-capture after columns were added).
        """
        ver = quote_ident(bk.versions_table_name(layout.name))
        key_match = " AND ".join(
            f"v.{quote_ident(bk.key_column(i))} = t.{quote_ident(col)}" for i, col in enumerate(layout.primary_key)
        )
        if since is None:
            condition = f"NOT EXISTS (SELECT 1 FROM {ver} AS v WHERE {key_match})"
            params: dict[str, int] = {}
        else:
            condition = (
                f"EXISTS (SELECT 1 FROM {ver} AS v WHERE {key_match} AND v.origin = :node "
                "AND v.deleted = 0 AND v.version > :since)"
            )
            params = {"node": self.node_id, "since": since}
        base = int(
            conn.execute(f"SELECT max({_NOW_MS_SQL} << 16, hlc + 1) FROM {quote_ident(bk.CLOCK_TABLE)}").fetchone()[0]
        )
        targets = ", ".join(quote_ident(bk.value_column(i)) for i in range(len(layout.columns)))
        values = ", ".join(f"t.{quote_ident(col)}" for col in layout.columns)
        cursor = conn.execute(
            f"INSERT INTO {quote_ident(bk.log_table_name(layout.name))} (id, layout, op, {targets}) "
            f"SELECT :base + row_number() OVER () - 1, :layout, {bk.OP_UPSERT}, {values} "
            f"FROM {quote_ident(layout.name)} AS t WHERE {condition}",
            {**params, "base": base, "layout": layout_id},
        )
        count = max(cursor.rowcount, 0)
        if count:
            bk.advance_clock(conn, base + count - 1)
        return count

    def _claim_log(self, conn: sqlite3.Connection) -> list[str]:
        """Make this node the owner of the change log, refusing a silent change of node id.

        A database whose log belongs to another node id is another node's database (its id was
        changed on the command line, or its file was copied here). Taking it over silently would
        rewrite its identity; that needs `allow_node_id_change`. Its pending rows are kept either
        way: they are committed local changes, published from now on under this node's id
        (same values and versions; last writer wins makes a second copy of them harmless).
        Snapshot restores never get here: they set the copy's owner before it goes live.
        """
        owner = bk.get_meta(conn, bk.META_NODE_ID)
        if owner is not None and int(owner) != self.node_id:
            if not self.allow_node_id_change:
                raise NodeIdChangeError(node_id_change_message(self.db_path, int(owner), self.node_id,
                                                               _count_log_rows(conn)))
            bk.set_meta(conn, bk.META_NODE_ID, self.node_id)
            return [
                f"database {self.db_path} belonged to node id {owner}; it is node id {self.node_id}'s now "
                f"(--allow-node-id-change); its {_count_log_rows(conn)} unpublished row(s) are published under "
                f"id {self.node_id}"
            ]
        if owner is None:
            bk.set_meta(conn, bk.META_NODE_ID, self.node_id)
        return []

    def _layout_id(self, conn: sqlite3.Connection, layout: TableLayout) -> int:
        columns = json.dumps(list(layout.columns))
        primary_key = json.dumps(list(layout.primary_key))
        row = conn.execute(
            f"SELECT max(id) FROM {quote_ident(bk.LAYOUTS_TABLE)} WHERE tbl = ? AND columns = ? AND primary_key = ?",
            (layout.name, columns, primary_key),
        ).fetchone()
        if row[0] is not None:
            return int(row[0])
        cursor = conn.execute(
            f"INSERT INTO {quote_ident(bk.LAYOUTS_TABLE)} (tbl, columns, primary_key, fingerprint) VALUES (?, ?, ?, ?)",
            (layout.name, columns, primary_key, layout.fingerprint),
        )
        return int(cursor.lastrowid)

    def _ensure_log_table(self, conn: sqlite3.Connection, layout: TableLayout) -> None:
        name = bk.log_table_name(layout.name)
        needed = [bk.value_column(i) for i in range(len(layout.columns))]
        if not bk.object_exists(conn, name):
            # Value columns without a declared type: no affinity, so every value keeps its
            # exact storage class (REAL stays REAL, '1' stays TEXT, BLOBs stay BLOBs).
            value_columns = "".join(f", {quote_ident(col)}" for col in needed)
            conn.execute(
                f"CREATE TABLE {quote_ident(name)} (id INTEGER PRIMARY KEY, layout INTEGER NOT NULL, "
                f"op INTEGER NOT NULL{value_columns})"
            )
            return
        present = {row[1] for row in conn.execute("PRAGMA main.table_info(" + quote_ident(name) + ")")}
        for col in needed:
            if col not in present:
                conn.execute(f"ALTER TABLE {quote_ident(name)} ADD COLUMN {quote_ident(col)}")

    def _drop_empty_orphan_logs(self, conn: sqlite3.Connection) -> int:
        """Drop log tables that no trigger writes to any more, once nothing in them awaits publishing.

        Decided from the schema, not from this instance's memory: dropping a log table that a
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

    def _load_layouts(self) -> dict[int, _Layout]:
        out = {}
        for layout_id, (table, columns, primary_key, fingerprint) in bk.layouts_by_id(self._conn).items():
            out[layout_id] = _Layout(
                id=layout_id,
                table=table,
                columns=columns,
                primary_key=primary_key,
                fingerprint=fingerprint,
                pk_indexes=tuple(columns.index(col) for col in primary_key),
            )
        return out

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
        total = 0
        with read_transaction(self._conn):
            for log_name in bk.log_tables(self._conn):
                total += int(self._conn.execute(f"SELECT count(*) FROM {quote_ident(log_name)}").fetchone()[0])
        return total

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

    def read_pending_rows(self, limit: int = 1000, after_id: int = 0) -> "PendingRows":
        """The oldest `limit` log rows with id > after_id as raw tuples (id, layout, op, c0, ...).

        In id order. One `SELECT *` per log table in one read snapshot; no per-row Python
        objects. Retire what was acknowledged with mark_rows_published(). Never blocks writers
        (WAL). after_id lets a pipelined publisher read past rows it already sent and whose
        acks are pending: log ids come from the clock, which only grows, so every row committed
        after a read has an id above every row that read saw.
        """
        if limit <= 0:
            return PendingRows([], self._layouts, {})
        per_log: dict[str, list[tuple]] = {}
        with read_transaction(self._conn):
            for log_name in bk.log_tables(self._conn):
                rows = self._conn.execute(
                    f"SELECT * FROM {quote_ident(log_name)} WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
                ).fetchall()
                if rows:
                    per_log[log_name] = rows
        if len(per_log) == 1:
            (log_name, rows), = per_log.items()
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
        layouts = self._layouts
        if any(layout_id not in layouts for layout_id in set(map(_SECOND, rows))):
            self._layouts = layouts = self._load_layouts()
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
            self._before_retiring()
            existing = bk.log_tables(self._conn)
            for log_name, ids in by_table.items():
                # Ids read by another instance are not in our map: look in every log table.
                targets = [log_name] if log_name is not None else list(existing)
                for target in targets:
                    if target not in existing:
                        continue
                    removed += self._delete_ids(target, ids)
        return removed

    def mark_rows_published(self, read: "PendingRows", acked: Collection[int] | None = None) -> int:
        """Retire rows of a read_pending_rows() result that JetStream acknowledged.

        acked=None: every row of `read` was acknowledged. Otherwise only the ids in `acked`.
        Rows are deleted by id ranges: each run of consecutive acknowledged rows of one log
        table is one `DELETE ... WHERE id BETWEEN first AND last`. That removes nothing else:
        log ids come from the clock, which only grows, so a row committed after the read has
        an id above every row the read saw. (Should a range ever remove more rows than it
        should, that table falls back to deleting by id.) One transaction; returns rows removed.
        """
        acked_set = None if acked is None else set(acked)
        plans: list[tuple[str, list[tuple[int, int]], list[int]]] = []
        for log_name, ids in read.ids_by_log.items():
            if acked_set is None or acked_set.issuperset(ids):
                runs = [(ids[0], ids[-1])]
                chosen = ids
            else:
                chosen = [log_id for log_id in ids if log_id in acked_set]
                runs = []
                start = previous = None
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
        if not plans:
            return 0
        removed = 0
        conn = self._retire_conn or self._conn
        with write_transaction(conn):
            self._before_retiring(conn)
            existing = bk.log_tables(conn)
            for log_name, runs, chosen in plans:
                if log_name not in existing:
                    continue
                conn.execute("SAVEPOINT marmot_retire")
                count = max(
                    conn.executemany(f"DELETE FROM {quote_ident(log_name)} WHERE id BETWEEN ? AND ?", runs).rowcount, 0
                )
                if count > len(chosen):  # never expected: undo and go id by id
                    conn.execute("ROLLBACK TO marmot_retire")
                    count = self._delete_ids(log_name, [(log_id,) for log_id in chosen], conn)
                conn.execute("RELEASE marmot_retire")
                removed += count
        return removed

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

    def _before_retiring(self, conn: sqlite3.Connection | None = None) -> None:
        """Inside the retiring transaction: versions of every local write first, then the meta."""
        conn = conn or self._conn
        bk.fold_pending(conn)
        if schema_version(conn) == self._installed_schema_version:
            # Persist the narrowest catch-up window for a restarted runtime (see install()).
            bk.set_meta(conn, bk.META_SCHEMA_SEEN_CLOCK, bk.current_clock(conn))

    def _delete_ids(self, log_name: str, ids: list[tuple[int]], conn: sqlite3.Connection | None = None) -> int:
        cursor = (conn or self._conn).executemany(f"DELETE FROM {quote_ident(log_name)} WHERE id = ?", ids)
        return max(cursor.rowcount, 0)

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
            return self._drop_empty_orphan_logs(self._conn)

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
                layout_id = bk.get_meta(self._conn, _active_layout_key(name))
                if layout_id is not None:
                    logged += self._log_current_rows(self._conn, layout, int(layout_id), None)
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
                layout_id = bk.get_meta(self._conn, _active_layout_key(name))
                if layout_id is None:
                    continue
                logged += self._relog_own(self._conn, layout, int(layout_id))
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
            self._before_retiring(self._conn)
            for log_name in bk.log_tables(self._conn):
                removed += max(self._conn.execute(f"DELETE FROM {quote_ident(log_name)}").rowcount, 0)
        return removed

    def close(self) -> None:
        if self._retire_conn is not None:
            self._retire_conn.close()
            self._retire_conn = None
        self._conn.close()

    def __enter__(self) -> "ChangeCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
