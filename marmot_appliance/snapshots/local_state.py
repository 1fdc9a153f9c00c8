"""What a snapshot needs to know about a node's database: positions, clock, pending changes.

Names of the bookkeeping objects come from `replication.bookkeeping` (the capture side owns
them); everything here only reads them or rewrites them in a *copy* of the database, never in
the live file (the live file is only ever written by the backup API, see dbrestore.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from marmot_appliance.replication.sqlite_util import quote_ident
from marmot_appliance.replication.types import BOOKKEEPING_PREFIX, POSITIONS_TABLE

CLOCK_TABLE = BOOKKEEPING_PREFIX + "clock"
META_TABLE = BOOKKEEPING_PREFIX + "meta"
LOG_TABLE_PREFIX = BOOKKEEPING_PREFIX + "log_"
META_NODE_ID = "node_id"
BUSY_TIMEOUT_S = 30.0


def open_readonly(db_path: str | Path) -> sqlite3.Connection:
    """A read-only connection that never creates the file."""
    uri = Path(db_path).resolve().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)


def table_exists(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM main.sqlite_schema WHERE type = 'table' AND name = ?", (name,)).fetchone()
    return row is not None


def read_positions(conn: sqlite3.Connection) -> dict[str, int]:
    """Applied position per stream; {} for a database that never applied anything."""
    if not table_exists(conn, POSITIONS_TABLE):
        return {}
    return {str(s): int(q) for s, q in conn.execute(f"SELECT stream, seq FROM {quote_ident(POSITIONS_TABLE)}")}


def read_clock(conn: sqlite3.Connection) -> int:
    if not table_exists(conn, CLOCK_TABLE):
        return 0
    row = conn.execute(f"SELECT max(hlc) FROM {quote_ident(CLOCK_TABLE)}").fetchone()
    return int(row[0] or 0)


def log_tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT name FROM main.sqlite_schema WHERE type = 'table'").fetchall()
    # Exact prefix comparison: LIKE would treat "_" as a wildcard and catch user tables.
    return [row[0] for row in rows if row[0].startswith(LOG_TABLE_PREFIX)]


def pending_count(conn: sqlite3.Connection) -> int:
    """Local changes captured but not yet published.

    Same definition as `ChangeCapture.pending_count`: capture deletes a log row in the
    transaction that marks it published, so every row still in a log table is unpublished.
    """
    total = 0
    for name in log_tables(conn):
        total += int(conn.execute(f"SELECT count(*) FROM {quote_ident(name)}").fetchone()[0])
    return total


def user_tables(conn: sqlite3.Connection) -> list[str]:
    """Ordinary tables that are not bookkeeping and not SQLite's own."""
    rows = conn.execute("SELECT name, type FROM pragma_table_list WHERE schema = 'main'").fetchall()
    return sorted(
        name
        for name, kind in rows
        if kind == "table" and not name.startswith(BOOKKEEPING_PREFIX) and not name.startswith("sqlite_")
    )


def has_user_rows(conn: sqlite3.Connection) -> bool:
    for name in user_tables(conn):
        if conn.execute(f"SELECT 1 FROM {quote_ident(name)} LIMIT 1").fetchone():
            return True
    return False
