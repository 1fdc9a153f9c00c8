"""Order-independent digest of every user table: the convergence check.

Two databases hold identical rows in a table exactly when the table's digests are equal,
whatever the physical row order, rowids or page layout. Every value is hashed with its storage
class (1 and 1.0 and '1' differ; -0.0 differs from 0.0), columns are taken by name in sorted
order (so column order in the CREATE TABLE does not matter), and the per-row hashes are sorted
before they are combined.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from pathlib import Path

from marmot_appliance.replication.canonical import encode_value
from marmot_appliance.replication.introspect import user_tables
from marmot_appliance.replication.sqlite_util import connect, quote_ident, read_transaction


def row_digest(columns: Iterable[str], values: Iterable[object]) -> bytes:
    """Hash of one row given its column names and values (columns in any order)."""
    pairs = sorted(zip(columns, values), key=lambda pair: pair[0])
    hasher = hashlib.sha256()
    for name, value in pairs:
        encoded_name = name.encode()
        hasher.update(struct.pack(">I", len(encoded_name)) + encoded_name + encode_value(value))
    return hasher.digest()


def table_digest(db_path: str | Path, tables: Iterable[str] | None = None) -> dict[str, str]:
    """table -> hex digest of its rows, for every user table (or the given ones).

    Bookkeeping tables, sqlite_* tables, virtual and shadow tables are not user tables. A named
    table that does not exist maps to "missing". Reads one consistent snapshot, read-only.
    """
    conn = connect(db_path, readonly=True)
    try:
        with read_transaction(conn):
            names = list(tables) if tables is not None else user_tables(conn)
            existing = {name.lower() for name in user_tables(conn)}
            result: dict[str, str] = {}
            for name in names:
                if name.lower() not in existing:
                    result[name] = "missing"
                    continue
                cursor = conn.execute(f"SELECT * FROM {quote_ident(name)}")
                columns = [description[0] for description in cursor.description]
                row_hashes = sorted(row_digest(columns, row) for row in cursor)
                combined = hashlib.sha256()
                combined.update(struct.pack(">Q", len(row_hashes)))
                for row_hash in row_hashes:
                    combined.update(row_hash)
                result[name] = combined.hexdigest()
            return result
    finally:
        conn.close()
