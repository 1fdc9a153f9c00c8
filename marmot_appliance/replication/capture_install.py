"""Installing capture: the triggers, log tables and layouts that record every committed change.

The triggers use nothing but built-in SQL (no application-defined functions), so any client in
any process keeps working, also with `PRAGMA trusted_schema=OFF`, and its writes are captured.
Per captured row a trigger does two things (keep the trigger lean; docs/capture.md):

  1. advance the one-row hybrid logical clock: hlc = max(now_ms << 16, hlc + 1)
  2. insert one log row whose id *is* that clock value (unique, in commit order across tables)

Versions are folded into the versions tables later, in Python, when rows are marked published
(or before the applier compares versions), never per row inside the trigger.

Tables without a primary key are *skipped* with a warning: the only identity such a row has is
its rowid, which VACUUM may renumber and which two nodes allocate independently, so the copies
could never be matched reliably. Tables keyed by an INTEGER PRIMARY KEY (a rowid alias) are
captured with a warning: two nodes inserting concurrently can pick the same id, and then the
newer write wins and the other insert is lost.

Reading and retiring what the triggers logged is replication/change_log.py; ChangeCapture
(replication/capture.py) holds the connection and drives both.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from marmot_appliance.errors import DatabaseStateError
from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.change_log import count_log_rows, drop_empty_orphan_logs
from marmot_appliance.replication.introspect import TableLayout, table_layout, user_tables
from marmot_appliance.replication.sqlite_util import (
    DEFAULT_BUSY_TIMEOUT_MS,
    connect,
    journal_mode,
    quote_ident,
    schema_version,
    write_transaction,
)
from marmot_appliance.replication.types import BOOKKEEPING_PREFIX
from marmot_appliance.spec.model import TableSelection

# Built-in SQL only: julianday('now') is stable within one statement step, and `hlc + 1`
# keeps every value unique and increasing even within one millisecond.
_NOW_MS_SQL = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
_ADVANCE_CLOCK_SQL = f"UPDATE {quote_ident(bk.CLOCK_TABLE)} SET hlc = max({_NOW_MS_SQL} << 16, hlc + 1);"
_NOT_APPLYING_SQL = f"NOT EXISTS (SELECT 1 FROM {quote_ident(bk.MARKER_TABLE)})"


@dataclass(frozen=True)
class CaptureReport:
    tables: tuple[str, ...]  # tables whose changes are captured
    warnings: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)  # table -> why it is not captured
    changed: bool = False  # whether install() had to change any trigger or bookkeeping table


@dataclass(frozen=True)
class Installed:
    """What one install_capture() left in place, for the ChangeCapture that holds the connection."""

    report: CaptureReport
    captured: dict[str, TableLayout]
    schema_version: int  # the schema the triggers were written for
    clock: int  # the clock value when that schema was last seen


class NodeIdChangeError(DatabaseStateError):
    """The database belongs to another node id and the operator did not allow taking it over."""


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
        return meta_int(conn, bk.META_NODE_ID), count_log_rows(conn)
    finally:
        conn.close()


def meta_int(conn: sqlite3.Connection, key: str) -> int | None:
    """A meta value that holds a number (node id, layout id, clock), or None when unset."""
    return _as_int(bk.get_meta(conn, key))


def _as_int(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, (int, float, str, bytes)):
        raise TypeError(f"not a number: {value!r}")
    return int(value)


def active_layout_key(table: str) -> str:
    return f"active_layout:{table}"


def trigger_sql(layout: TableLayout, layout_id: int) -> dict[str, str]:
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


def install_capture(
    conn: sqlite3.Connection,
    *,
    db_path: Path,
    node_id: int,
    selection: TableSelection,
    allow_node_id_change: bool,
    schema_seen_clock: int | None,
) -> Installed:
    """Install (or bring up to date) capture in one BEGIN IMMEDIATE transaction.

    See ChangeCapture.install (replication/capture.py) for what is logged again and why;
    schema_seen_clock is the clock value at the last moment this process saw the installed
    schema unchanged (None: use the value persisted in the meta table).
    """
    warnings: list[str] = []
    skipped: dict[str, str] = {}
    captured: dict[str, TableLayout] = {}
    with write_transaction(conn):
        version_before = schema_version(conn)
        bk.ensure_bookkeeping(conn)
        first_install = bk.get_meta(conn, bk.META_SCHEMA_VERSION) is None
        warnings += _claim_log(conn, db_path, node_id, allow_node_id_change)
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
            if not selection.selects(name):
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
            layout_id = _layout_id(conn, layout)
            previous = bk.get_meta(conn, active_layout_key(name))
            previous_id = _as_int(previous)
            was_captured = bk.trigger_name(name, "ins") in existing and previous_id is not None
            if not was_captured:
                if not first_install:
                    catch_up.append((layout, layout_id, "backfill"))
            elif previous_id != layout_id and previous_id is not None and _gained_columns(conn, previous_id, layout):
                catch_up.append((layout, layout_id, "relog"))
            _ensure_log_table(conn, layout)
            bk.ensure_versions_table(conn, layout)
            desired_triggers.update(trigger_sql(layout, layout_id))
            if previous != layout_id:
                bk.set_meta(conn, active_layout_key(name), layout_id)
            captured[name] = layout

        for name, sql in existing.items():
            if desired_triggers.get(name) != sql:
                conn.execute(f"DROP TRIGGER {quote_ident(name)}")
        for name, sql in desired_triggers.items():
            if existing.get(name) != sql:
                conn.execute(sql)
        since = schema_seen_clock
        if since is None:
            since = meta_int(conn, bk.META_SCHEMA_SEEN_CLOCK) or 0
        for layout, layout_id, kind in catch_up:
            log_current_rows(conn, layout, layout_id, node_id, since if kind == "relog" else None)
        drop_empty_orphan_logs(conn)
        installed_version = schema_version(conn)
        changed = installed_version != version_before
        if changed or bk.get_meta(conn, bk.META_SCHEMA_VERSION) != installed_version:
            bk.set_meta(conn, bk.META_SCHEMA_VERSION, installed_version)
        clock = bk.current_clock(conn)
        bk.set_meta(conn, bk.META_SCHEMA_SEEN_CLOCK, clock)
    report = CaptureReport(tables=tuple(sorted(captured)), warnings=tuple(warnings), skipped=skipped, changed=changed)
    return Installed(report, captured, installed_version, clock)


def _gained_columns(conn: sqlite3.Connection, previous_id: int, layout: TableLayout) -> bool:
    previous = bk.layouts_by_id(conn).get(previous_id)
    if previous is None:
        return True
    return not set(layout.columns) <= set(previous[1])


def log_current_rows(
    conn: sqlite3.Connection, layout: TableLayout, layout_id: int, node_id: int, since: int | None
) -> int:
    """Log the current state of rows as fresh upserts (new versions from the clock).

    since=None: every row without a version record (a newly captured table; rows applied
    from other nodes have records). since=N: rows whose newest version is node_id's own
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
        params = {"node": node_id, "since": since}
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


def _claim_log(conn: sqlite3.Connection, db_path: Path, node_id: int, allow_node_id_change: bool) -> list[str]:
    """Make node_id the owner of the change log, refusing a silent change of node id.

    A database whose log belongs to another node id is another node's database (its id was
    changed on the command line, or its file was copied here). Taking it over silently would
    rewrite its identity; that needs `allow_node_id_change`. Its pending rows are kept either
    way: they are committed local changes, published from now on under this node's id
    (same values and versions; last writer wins makes a second copy of them harmless).
    Snapshot restores never get here: they set the copy's owner before it goes live.
    """
    owner = meta_int(conn, bk.META_NODE_ID)
    if owner is not None and owner != node_id:
        if not allow_node_id_change:
            raise NodeIdChangeError(node_id_change_message(db_path, owner, node_id, count_log_rows(conn)))
        bk.set_meta(conn, bk.META_NODE_ID, node_id)
        return [
            f"database {db_path} belonged to node id {owner}; it is node id {node_id}'s now "
            f"(--allow-node-id-change); its {count_log_rows(conn)} unpublished row(s) are published under "
            f"id {node_id}"
        ]
    if owner is None:
        bk.set_meta(conn, bk.META_NODE_ID, node_id)
    return []


def _layout_id(conn: sqlite3.Connection, layout: TableLayout) -> int:
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
    return int(cursor.lastrowid or 0)


def _ensure_log_table(conn: sqlite3.Connection, layout: TableLayout) -> None:
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
