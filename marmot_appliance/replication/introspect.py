"""Table discovery and layout introspection for capture and apply.

Only ordinary tables of the main schema are candidates: `PRAGMA table_list` type 'table' (so
virtual tables and their shadow tables are skipped), minus SQLite's own `sqlite_%` tables and
our bookkeeping tables (exact prefix compare, never LIKE: `_` is a LIKE wildcard and would
catch user tables such as `xmarmotx...`).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass

from marmot_appliance.replication.sqlite_util import quote_ident
from marmot_appliance.replication.types import BOOKKEEPING_PREFIX

# table_xinfo "hidden": 0 normal, 1 hidden (virtual tables), 2 virtual generated, 3 stored generated.
_GENERATED = (2, 3)


@dataclass(frozen=True)
class TableLayout:
    """What capture and apply need to know about one user table."""

    name: str
    columns: tuple[str, ...]  # insertable columns, in table order (generated columns left out)
    primary_key: tuple[str, ...]  # in primary-key order; empty when the table has none
    pk_collations: tuple[str, ...]  # collation of each primary-key column (BINARY, NOCASE, ...)
    rowid_alias: bool  # the key is an INTEGER PRIMARY KEY (an alias of the rowid)
    without_rowid: bool
    # Each column's DEFAULT as SQL text from the schema (None: no default, i.e. NULL), in
    # `columns` order. The applier sets the columns an incoming row does not carry to these.
    defaults: tuple[str | None, ...] = ()

    @property
    def fingerprint(self) -> str:
        return table_fingerprint(self.columns, self.primary_key)

    @property
    def pk_indexes(self) -> tuple[int, ...]:
        return tuple(self.columns.index(col) for col in self.primary_key)


def table_fingerprint(columns: tuple[str, ...] | list[str], primary_key: tuple[str, ...] | list[str]) -> str:
    """Short stable hash of a table's column names and primary-key layout (16 hex chars)."""
    text = json.dumps([list(columns), list(primary_key)], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_bookkeeping_name(name: str) -> bool:
    return name.startswith(BOOKKEEPING_PREFIX)


def is_internal_name(name: str) -> bool:
    return name.lower().startswith("sqlite_") or is_bookkeeping_name(name)


def user_tables(conn: sqlite3.Connection) -> list[str]:
    """Ordinary tables of the main schema that replication may consider, sorted by name."""
    rows = conn.execute("PRAGMA main.table_list").fetchall()
    names = [row[1] for row in rows if row[0] == "main" and row[2] == "table" and not is_internal_name(row[1])]
    return sorted(names)


def table_layout(conn: sqlite3.Connection, table: str) -> TableLayout | None:
    """Layout of `table` in the main schema, or None when it does not exist."""
    listed = conn.execute("PRAGMA main.table_list(" + quote_ident(table) + ")").fetchall()
    # table_list(name) with an unknown name returns nothing.
    listed = [row for row in listed if row[0] == "main" and row[2] == "table"]
    if not listed:
        return None
    real_name = listed[0][1]
    without_rowid = bool(listed[0][4])
    info = conn.execute("PRAGMA main.table_xinfo(" + quote_ident(real_name) + ")").fetchall()
    columns: list[str] = []
    defaults: list[str | None] = []
    pk_positions: list[tuple[int, str, str]] = []
    for _cid, name, decl_type, _notnull, default, pk, hidden in info:
        if hidden in _GENERATED:
            continue
        columns.append(name)
        defaults.append(default)
        if pk:
            pk_positions.append((pk, name, (decl_type or "").strip().upper()))
    pk_positions.sort()
    primary_key = tuple(name for _pos, name, _type in pk_positions)
    rowid_alias = not without_rowid and len(pk_positions) == 1 and pk_positions[0][2] == "INTEGER"
    return TableLayout(
        name=real_name,
        columns=tuple(columns),
        primary_key=primary_key,
        pk_collations=_pk_collations(conn, real_name, primary_key, rowid_alias),
        rowid_alias=rowid_alias,
        without_rowid=without_rowid,
        defaults=tuple(defaults),
    )


def _pk_collations(conn: sqlite3.Connection, table: str, primary_key: tuple[str, ...], rowid_alias: bool) -> tuple[str, ...]:
    """The primary key's collations, read from its automatic index (a rowid alias has none)."""
    if not primary_key or rowid_alias:
        return tuple("BINARY" for _ in primary_key)
    for _seq, index_name, _unique, origin, _partial in conn.execute(
        "PRAGMA main.index_list(" + quote_ident(table) + ")"
    ).fetchall():
        if origin != "pk":
            continue
        by_column: dict[str, str] = {}
        for row in conn.execute("PRAGMA main.index_xinfo(" + quote_ident(index_name) + ")").fetchall():
            _seqno, _cid, col_name, _desc, coll, key = row
            if key and col_name is not None:
                by_column[col_name] = coll or "BINARY"
        return tuple(by_column.get(col, "BINARY") for col in primary_key)
    return tuple("BINARY" for _ in primary_key)


@dataclass(frozen=True)
class UniqueIndex:
    """A UNIQUE constraint or index other than the primary key, on plain columns."""

    name: str
    columns: tuple[str, ...]
    collations: tuple[str, ...]


def unique_indexes(conn: sqlite3.Connection, table: str) -> list[UniqueIndex]:
    """UNIQUE indexes of `table` besides its primary key. Partial and expression indexes are
    left out: which rows they cover cannot be matched with a plain column comparison."""
    out = []
    for _seq, name, unique, origin, partial in conn.execute(
        "PRAGMA main.index_list(" + quote_ident(table) + ")"
    ).fetchall():
        if not unique or origin == "pk" or partial:
            continue
        keys = [row for row in conn.execute("PRAGMA main.index_xinfo(" + quote_ident(name) + ")") if row[5]]
        if not keys or any(row[1] is None for row in keys):  # an expression in the index
            continue
        out.append(UniqueIndex(name, tuple(row[2] for row in keys), tuple(row[4] or "BINARY" for row in keys)))
    return out
