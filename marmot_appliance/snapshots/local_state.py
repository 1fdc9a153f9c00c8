"""What a snapshot needs to know about a node's database: positions, clock, pending changes.

The bookkeeping names and their readers come from the replication side, which owns them
(`replication.bookkeeping`, `replication.introspect`); what stays here reads a database that may
have no bookkeeping at all (a file saved without capture, an application's own copy), where the
replication readers assume their tables exist. Everything here only reads, or rewrites a *copy*
of the database, never the live file (the live file is only ever written by the backup API, see
dbrestore.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.introspect import user_tables
from marmot_appliance.replication.sqlite_util import quote_ident
from marmot_appliance.replication.types import POSITIONS_TABLE

BUSY_TIMEOUT_S = 30.0


def open_readonly(db_path: str | Path) -> sqlite3.Connection:
    """A read-only connection that never creates the file."""
    uri = Path(db_path).resolve().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)


def read_positions(conn: sqlite3.Connection) -> dict[str, int]:
    """Applied position per stream; {} for a database that never applied anything.

    (BatchApplier.positions reads the same table but needs it to exist.)
    """
    if not bk.object_exists(conn, POSITIONS_TABLE):
        return {}
    return {str(s): int(q) for s, q in conn.execute(f"SELECT stream, seq FROM {quote_ident(POSITIONS_TABLE)}")}


def read_clock(conn: sqlite3.Connection) -> int:
    """The node's clock; 0 without capture (bookkeeping.current_clock needs the table)."""
    if not bk.object_exists(conn, bk.CLOCK_TABLE):
        return 0
    row = conn.execute(f"SELECT max(hlc) FROM {quote_ident(bk.CLOCK_TABLE)}").fetchone()
    return int(row[0] or 0)


def pending_count(conn: sqlite3.Connection) -> int:
    """Local changes captured but not yet published.

    Same definition as `ChangeCapture.pending_count`, without a ChangeCapture: capture deletes a
    log row in the transaction that marks it published, so every row still in a log table is
    unpublished.
    """
    total = 0
    for name in bk.log_tables(conn):
        total += int(conn.execute(f"SELECT count(*) FROM {quote_ident(name)}").fetchone()[0])
    return total


def has_user_rows(conn: sqlite3.Connection) -> bool:
    for name in user_tables(conn):
        if conn.execute(f"SELECT 1 FROM {quote_ident(name)} LIMIT 1").fetchone():
            return True
    return False
