"""Names and DDL of every bookkeeping object capture and apply keep inside the user's database.

Everything starts with BOOKKEEPING_PREFIX so `--cleanup` (remove_bookkeeping) can find it by an
exact prefix compare and snapshots carry it along with the data it describes.

Objects:
  _marmot_clock          one row: the hybrid logical clock (ms << 16 | counter). Triggers advance
                         it for every captured row; the applier advances it to the newest
                         version it received, so a later local write always outranks what this
                         node has already seen.
  _marmot_apply_marker   empty except inside the applier's own transaction: the capture
                         triggers say WHEN NOT EXISTS (SELECT 1 FROM marker), so the applier's
                         writes are not captured again. SQLite has one writer at a time, so no
                         other connection ever sees the marker row.
  _marmot_meta           key/value: node id that owns the log, fold watermark, schema version,
                         database epoch (new on every snapshot restore: the position fence).
  _marmot_layouts        column layout of each captured table, one row per version of it; every
                         log row names the layout it was written with.
  _marmot_log_<table>    captured changes of one table: id (= HLC version, unique, commit order),
                         layout, op (0 upsert, 1 delete), then c0..cN in layout column order.
                         The value columns have no declared type, so values keep their exact
                         storage class.
  _marmot_ver_<table>    newest known (version, origin, deleted) per primary key: what the
                         applier's last-writer-wins check compares against. Deletes stay here as
                         tombstones.
  _marmot_positions      applied position per stream (same transaction as the rows).
  _marmot_stream_instances  which instance of each stream the positions count in (the stream's
                         creation time as JetStream reports it): a re-created stream starts its
                         sequences at 1 again, so old positions would drop its messages.
  _marmot_dead_letters   messages that could not be decoded or applied.
  _marmot_parked         rows for tables/columns this node does not have yet.
  _marmot_held           rows whose version lies further ahead of this node's clock than
                         replication.max_clock_skew_s allows, kept until time catches up
                         (due_at), with their origin and version for /health.
"""

from __future__ import annotations

import json
import sqlite3

from marmot_appliance.replication.introspect import TableLayout
from marmot_appliance.replication.sqlite_util import quote_ident, quote_text
from marmot_appliance.replication.types import BOOKKEEPING_PREFIX, DEAD_LETTER_TABLE, POSITIONS_TABLE

CLOCK_TABLE = BOOKKEEPING_PREFIX + "clock"
MARKER_TABLE = BOOKKEEPING_PREFIX + "apply_marker"
META_TABLE = BOOKKEEPING_PREFIX + "meta"
LAYOUTS_TABLE = BOOKKEEPING_PREFIX + "layouts"
PARKED_TABLE = BOOKKEEPING_PREFIX + "parked"
HELD_TABLE = BOOKKEEPING_PREFIX + "held"
LOG_TABLE_PREFIX = BOOKKEEPING_PREFIX + "log_"
VERSIONS_TABLE_PREFIX = BOOKKEEPING_PREFIX + "ver_"
TRIGGER_PREFIX = BOOKKEEPING_PREFIX + "trg_"

OP_UPSERT = 0
OP_DELETE = 1

META_NODE_ID = "node_id"
META_FOLDED_THROUGH = "folded_through"
META_SCHEMA_VERSION = "schema_version"
# Clock value when the schema was last seen equal to the installed one (install, mark_published).
META_SCHEMA_SEEN_CLOCK = "schema_seen_clock"
# Changes whenever the file's contents are replaced (snapshot restore): the applier writes a
# position only while the file still carries the epoch it adopted (see applier.py, the fence).
META_DATABASE_EPOCH = "database_epoch"
# Tombstones with a version at or below this were collected (replication/horizon.py): every
# incoming row at or below it is stale here, whether or not its key still has a version record.
META_TOMBSTONE_HORIZON = "tombstones_collected_through"

# Columns of the versions table after the key columns k0..kN.
_VERSION_COLUMNS = ("version", "origin", "deleted")

STREAM_INSTANCES_TABLE = BOOKKEEPING_PREFIX + "stream_instances"

_FIXED_DDL = (
    f"CREATE TABLE IF NOT EXISTS {quote_ident(STREAM_INSTANCES_TABLE)} ("
    "stream TEXT PRIMARY KEY, instance TEXT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {quote_ident(CLOCK_TABLE)} ("
    "id INTEGER PRIMARY KEY CHECK (id = 0), hlc INTEGER NOT NULL)",
    f"INSERT OR IGNORE INTO {quote_ident(CLOCK_TABLE)} (id, hlc) VALUES (0, 0)",
    f"CREATE TABLE IF NOT EXISTS {quote_ident(MARKER_TABLE)} (id INTEGER PRIMARY KEY)",
    f"CREATE TABLE IF NOT EXISTS {quote_ident(META_TABLE)} (key TEXT PRIMARY KEY, value)",
    f"CREATE TABLE IF NOT EXISTS {quote_ident(LAYOUTS_TABLE)} ("
    "id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, columns TEXT NOT NULL, "
    "primary_key TEXT NOT NULL, fingerprint TEXT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {quote_ident(POSITIONS_TABLE)} ("
    "stream TEXT PRIMARY KEY, seq INTEGER NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {quote_ident(DEAD_LETTER_TABLE)} ("
    "id INTEGER PRIMARY KEY, stream TEXT, seq INTEGER, reason TEXT NOT NULL, "
    "payload BLOB, received_at REAL NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {quote_ident(PARKED_TABLE)} ("
    "id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, reason TEXT NOT NULL, change BLOB NOT NULL, "
    "stream TEXT, seq INTEGER, parked_at REAL NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {quote_ident(HELD_TABLE)} ("
    "id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, reason TEXT NOT NULL, change BLOB NOT NULL, "
    "stream TEXT, seq INTEGER, held_at REAL NOT NULL, due_at REAL NOT NULL, "
    "origin INTEGER NOT NULL, version INTEGER NOT NULL)",
    # A retry visits one table's parked rows in id order, chunk by chunk; held rows by due time.
    f"CREATE INDEX IF NOT EXISTS {quote_ident(PARKED_TABLE + '_by_table')} ON {quote_ident(PARKED_TABLE)} (tbl, id)",
    f"CREATE INDEX IF NOT EXISTS {quote_ident(HELD_TABLE + '_by_due')} ON {quote_ident(HELD_TABLE)} (due_at)",
)


def log_table_name(table: str) -> str:
    return LOG_TABLE_PREFIX + table


def versions_table_name(table: str) -> str:
    return VERSIONS_TABLE_PREFIX + table


def trigger_name(table: str, kind: str) -> str:
    return f"{TRIGGER_PREFIX}{table}_{kind}"


def value_column(index: int) -> str:
    return f"c{index}"


def key_column(index: int) -> str:
    return f"k{index}"


def object_exists(conn: sqlite3.Connection, name: str, kind: str = "table") -> bool:
    row = conn.execute("SELECT 1 FROM main.sqlite_schema WHERE type = ? AND name = ?", (kind, name)).fetchone()
    return row is not None


def ensure_bookkeeping(conn: sqlite3.Connection) -> None:
    """Create the fixed bookkeeping tables (idempotent; call inside a write transaction)."""
    # Skip the DDL when everything is there: CREATE ... IF NOT EXISTS on existing tables does
    # not bump schema_version, but checking first keeps this a pure read in the common case.
    wanted = (
        CLOCK_TABLE, MARKER_TABLE, META_TABLE, LAYOUTS_TABLE, POSITIONS_TABLE, DEAD_LETTER_TABLE, PARKED_TABLE,
        HELD_TABLE, STREAM_INSTANCES_TABLE,
    )
    present = {
        row[0]
        for row in conn.execute(
            "SELECT name FROM main.sqlite_schema WHERE type = 'table' AND name IN (%s)" % ",".join("?" * len(wanted)),
            wanted,
        )
    }
    if len(present) == len(wanted):
        return
    for statement in _FIXED_DDL:
        conn.execute(statement)


# Statements the applier runs once per transaction: built once (the sqlite3 module then finds
# them in its statement cache by the same string object).
_GET_META_SQL = f"SELECT value FROM {quote_ident(META_TABLE)} WHERE key = ?"
_SET_META_SQL = (
    f"INSERT INTO {quote_ident(META_TABLE)} (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_CURRENT_CLOCK_SQL = f"SELECT hlc FROM {quote_ident(CLOCK_TABLE)}"
_ADVANCE_CLOCK_SQL = f"UPDATE {quote_ident(CLOCK_TABLE)} SET hlc = max(hlc, ?)"
# The clock and the fold watermark in one read: the fold's "anything new?" check.
_CLOCK_AND_WATERMARK_SQL = (
    f"SELECT hlc, (SELECT value FROM {quote_ident(META_TABLE)} WHERE key = {quote_text(META_FOLDED_THROUGH)}) "
    f"FROM {quote_ident(CLOCK_TABLE)}"
)
# Move the fold watermark up to the clock (no log row can lie in between: see advance_clock_and_watermark).
_WATERMARK_TO_CLOCK_SQL = (
    f"INSERT INTO {quote_ident(META_TABLE)} (key, value) "
    f"SELECT {quote_text(META_FOLDED_THROUGH)}, hlc FROM {quote_ident(CLOCK_TABLE)} WHERE true "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


# What a meta value can be: the meta table's value column has no declared type, so it holds
# whatever SQLite storage class was written.
MetaValue = int | float | str | bytes | None


def get_meta(conn: sqlite3.Connection, key: str, default: MetaValue = None) -> MetaValue:
    row = conn.execute(_GET_META_SQL, (key,)).fetchone()
    if row is None:
        return default
    value: MetaValue = row[0]
    return value


def set_meta(conn: sqlite3.Connection, key: str, value: object) -> None:
    conn.execute(_SET_META_SQL, (key, value))


def current_clock(conn: sqlite3.Connection) -> int:
    return int(conn.execute(_CURRENT_CLOCK_SQL).fetchone()[0])


def advance_clock(conn: sqlite3.Connection, version: int) -> None:
    conn.execute(_ADVANCE_CLOCK_SQL, (version,))


def advance_clock_and_watermark(conn: sqlite3.Connection, version: int) -> None:
    """Advance the clock to `version` and move the fold watermark to the clock, in two statements.

    Only for a transaction that folded first and then wrote nothing that is logged (the
    applier, under its marker): no log row can then lie between the old watermark and the
    advanced clock, so the next fold need not scan for one.
    """
    conn.execute(_ADVANCE_CLOCK_SQL, (version,))
    conn.execute(_WATERMARK_TO_CLOCK_SQL)


# ---------------------------------------------------------------------------------------------
# Versions tables


def versions_key_arity(conn: sqlite3.Connection, table: str) -> int | None:
    """Number of key columns of the table's versions table, or None when it does not exist."""
    name = versions_table_name(table)
    if not object_exists(conn, name):
        return None
    columns = [row[1] for row in conn.execute("PRAGMA main.table_info(" + quote_ident(name) + ")")]
    return sum(1 for col in columns if col not in _VERSION_COLUMNS)


def ensure_versions_table(conn: sqlite3.Connection, layout: TableLayout) -> bool:
    """Create (or, when the primary key's arity changed, re-create) the table's versions table.

    Key columns copy the primary key's collations so two keys are "the same row" here exactly
    when they are in the user table. Returns True when DDL ran.
    """
    arity = versions_key_arity(conn, layout.name)
    if arity == len(layout.primary_key):
        return False
    name = quote_ident(versions_table_name(layout.name))
    if arity is not None:
        # The primary key changed shape: old versions cannot be matched to new keys any more.
        conn.execute(f"DROP TABLE {name}")
    keys = [
        f"{quote_ident(key_column(i))} COLLATE {quote_ident(coll)}" for i, coll in enumerate(layout.pk_collations)
    ]
    key_list = ", ".join(quote_ident(key_column(i)) for i in range(len(layout.primary_key)))
    conn.execute(
        f"CREATE TABLE {name} ({', '.join(keys)}, version INTEGER NOT NULL, origin INTEGER NOT NULL, "
        f"deleted INTEGER NOT NULL, PRIMARY KEY ({key_list})) WITHOUT ROWID"
    )
    return True


def tombstone_horizon(conn: sqlite3.Connection) -> int:
    """The stored tombstone horizon (0 before the first collection). A row at or below it is
    stale: every version at or below it was applied here before tombstones were collected, so
    the key's newest such version is either still recorded or was a collected tombstone
    (docs/capture.md, "Tombstone collection").

    Only collection raises it, in its own write transaction, so a value read inside a write
    transaction holds until that transaction ends: the applier reads it once per transaction
    and passes it to the versions upsert, instead of a subquery the upsert ran for every row.
    """
    return int(get_meta(conn, META_TOMBSTONE_HORIZON, 0) or 0)


def versions_upsert_sql(table: str, key_count: int) -> str:
    """Record (version, origin, deleted) for a key unless a newer or equal version is known, or
    the version lies at or below the tombstone horizon (stale: see tombstone_horizon).

    Parameters: the key values, version, origin, deleted, then the horizon of this transaction.
    """
    keys = ", ".join(quote_ident(key_column(i)) for i in range(key_count))
    marks = ", ".join(f"?{i + 1}" for i in range(key_count + 3))
    return (
        f"INSERT INTO {quote_ident(versions_table_name(table))} ({keys}, version, origin, deleted) "
        f"SELECT {marks} WHERE ?{key_count + 1} > ?{key_count + 4} "
        f"ON CONFLICT ({keys}) DO UPDATE SET version = excluded.version, "
        "origin = excluded.origin, deleted = excluded.deleted "
        "WHERE (excluded.version, excluded.origin) > (version, origin)"
    )


def versions_upsert_numbered_sql(
    table: str, key_params: list[int], version_param: int, origin_param: int, deleted: int
) -> str:
    """versions_upsert_sql over numbered parameters (?N) of a whole row; `deleted` is fixed.

    Lets the row's own parameter list ([*values, version, origin]) feed this statement and the
    row upsert alike, with no per-row tuple built for the versions table. It has no horizon
    check: the caller leaves out the rows at or below the tombstone horizon (stale), which it
    finds with one min() over the batch's versions.
    """
    keys = ", ".join(quote_ident(key_column(i)) for i in range(len(key_params)))
    marks = ", ".join(f"?{p}" for p in key_params)
    return (
        f"INSERT INTO {quote_ident(versions_table_name(table))} ({keys}, version, origin, deleted) "
        f"VALUES ({marks}, ?{version_param}, ?{origin_param}, {int(deleted)}) "
        f"ON CONFLICT ({keys}) DO UPDATE SET version = excluded.version, "
        "origin = excluded.origin, deleted = excluded.deleted "
        "WHERE (excluded.version, excluded.origin) > (version, origin)"
    )


def recorded_version_sql(table: str, key_params: list[int], version_param: int, origin_param: int) -> str:
    """SQL condition: the versions table records exactly this (version, origin) for the key.

    After the batch's versions were recorded (newer ones only), this holds exactly for the rows
    that won. key_params are the numbered parameters (?N) holding the key values, in key order.
    """
    return recorded_version_condition(
        table, [f"?{p}" for p in key_params], f"?{version_param}", f"?{origin_param}"
    )


def recorded_version_condition(table: str, key_refs: list[str], version_ref: str, origin_ref: str) -> str:
    """recorded_version_sql over any expressions: parameters (?N), or the columns of the
    applier's set table (apply_plan.set_ref: "+src.pN", which compares like a parameter)."""
    conditions = " AND ".join(f"{quote_ident(key_column(i))} = {ref}" for i, ref in enumerate(key_refs))
    return (
        f"EXISTS (SELECT 1 FROM {quote_ident(versions_table_name(table))} WHERE {conditions} "
        f"AND version = {version_ref} AND origin = {origin_ref})"
    )


def versions_upsert_set_sql(
    table: str, key_refs: list[str], version_ref: str, origin_ref: str, deleted: int, source: str, order: str
) -> str:
    """versions_upsert_numbered_sql over the rows of a set table (`source`, in `order`): one
    statement for a whole row group, row by row in the group's order as executemany would."""
    keys = ", ".join(quote_ident(key_column(i)) for i in range(len(key_refs)))
    return (
        f"INSERT INTO {quote_ident(versions_table_name(table))} ({keys}, version, origin, deleted) "
        f"SELECT {', '.join(key_refs)}, {version_ref}, {origin_ref}, {int(deleted)} FROM {source} "
        f"WHERE true ORDER BY {order} "
        f"ON CONFLICT ({keys}) DO UPDATE SET version = excluded.version, "
        "origin = excluded.origin, deleted = excluded.deleted "
        "WHERE (excluded.version, excluded.origin) > (version, origin)"
    )


# ---------------------------------------------------------------------------------------------
# Folding local log rows into the versions tables


def log_tables(conn: sqlite3.Connection) -> dict[str, str]:
    """Existing log tables: log table name -> user table name."""
    rows = conn.execute("SELECT name FROM main.sqlite_schema WHERE type = 'table'").fetchall()
    return {row[0]: row[0][len(LOG_TABLE_PREFIX) :] for row in rows if row[0].startswith(LOG_TABLE_PREFIX)}


def layouts_by_id(conn: sqlite3.Connection) -> dict[int, tuple[str, tuple[str, ...], tuple[str, ...], str]]:
    """layout id -> (table, columns, primary key, fingerprint)."""

    out = {}
    for layout_id, tbl, columns, primary_key, fingerprint in conn.execute(
        f"SELECT id, tbl, columns, primary_key, fingerprint FROM {quote_ident(LAYOUTS_TABLE)}"
    ):
        out[int(layout_id)] = (tbl, tuple(json.loads(columns)), tuple(json.loads(primary_key)), fingerprint)
    return out


def fold_pending(conn: sqlite3.Connection) -> int:
    """Fold the versions of local log rows not folded yet into the versions tables.

    Must run inside a write transaction. Log ids are HLC values, and the clock only grows, so
    "not folded yet" is simply id > the watermark, and the new watermark is the current clock.
    Local rows not yet published are newer-than-published local state: the applier must see
    their versions, so it folds before comparing. Returns the number of log rows folded.
    """
    clock, watermark = conn.execute(_CLOCK_AND_WATERMARK_SQL).fetchone()
    clock, watermark = int(clock), int(watermark or 0)
    if clock <= watermark:
        return 0
    node_id = get_meta(conn, META_NODE_ID)
    folded = 0
    if node_id is not None:
        layouts = None
        for log_name, table in log_tables(conn).items():
            layout_ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT DISTINCT layout FROM {quote_ident(log_name)} WHERE id > ?", (watermark,)
                )
            ]
            if not layout_ids:
                continue
            if layouts is None:
                layouts = layouts_by_id(conn)
            arity = versions_key_arity(conn, table)
            for layout_id in layout_ids:
                known = layouts.get(int(layout_id))
                if known is None or arity is None or len(known[2]) != arity:
                    continue  # the key changed shape since: these versions cannot be matched
                _tbl, columns, primary_key, _fp = known
                key_values = [quote_ident(value_column(columns.index(col))) for col in primary_key]
                not_null = " AND ".join(f"{expr} IS NOT NULL" for expr in key_values)
                keys = ", ".join(quote_ident(key_column(i)) for i in range(arity))
                cursor = conn.execute(
                    f"INSERT INTO {quote_ident(versions_table_name(table))} ({keys}, version, origin, deleted) "
                    f"SELECT {', '.join(key_values)}, id, ?, op FROM {quote_ident(log_name)} "
                    f"WHERE id > ? AND layout = ? AND {not_null} ORDER BY id "
                    f"ON CONFLICT ({keys}) DO UPDATE SET version = excluded.version, "
                    "origin = excluded.origin, deleted = excluded.deleted "
                    "WHERE (excluded.version, excluded.origin) > (version, origin)",
                    (int(node_id), watermark, layout_id),
                )
                folded += max(cursor.rowcount, 0)
    set_meta(conn, META_FOLDED_THROUGH, clock)
    return folded
