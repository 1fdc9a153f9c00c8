"""What a database's schema looks like, read with SQLite's own introspection.

`read_shape` reads the user's tables (`PRAGMA table_xinfo`), indexes, views and triggers
(`sqlite_schema`) of one connection; replication bookkeeping and SQLite's internal objects are
left out. The same function reads a node's database and the in-memory database built from the
declared schema files, so the two compare like for like. Names compare case-insensitively, as
SQLite resolves them.

A table's fingerprint hashes its columns (name, declared type, NOT NULL, default, key position,
generated) and the definitions of its indexes and triggers: two nodes with equal fingerprints
for a table hold the same schema for it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass, field

from marmot_appliance.replication.introspect import is_internal_name
from marmot_appliance.replication.sqlite_util import quote_ident

OBJECT_KINDS = ("index", "view", "trigger")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    notnull: bool
    default: str | None  # the DEFAULT as SQL text, None without one
    pk: int  # position in the primary key, 0 when not part of it
    hidden: int  # table_xinfo: 0 normal, 2/3 generated

    def describe(self) -> str:
        parts = [self.type or "(no type)"]
        if self.notnull:
            parts.append("NOT NULL")
        if self.default is not None:
            parts.append(f"DEFAULT {self.default}")
        if self.pk:
            parts.append("PRIMARY KEY")
        if self.hidden in (2, 3):
            parts.append("GENERATED")
        return " ".join(parts)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    without_rowid: bool
    strict: bool
    sql: str  # the CREATE statement as SQLite stores it

    def column(self, name: str) -> Column | None:
        for column in self.columns:
            if column.name.lower() == name.lower():
                return column
        return None

    @property
    def primary_key(self) -> tuple[str, ...]:
        return tuple(c.name.lower() for c in sorted(self.columns, key=lambda c: c.pk) if c.pk)


@dataclass(frozen=True)
class SchemaObject:
    """An index, view or trigger: its kind, table and normalized definition."""

    kind: str
    name: str
    table: str
    sql: str  # the CREATE statement as SQLite stores it

    @property
    def definition(self) -> str:
        return normalize_sql(self.sql)


@dataclass(frozen=True)
class SchemaShape:
    tables: dict[str, Table] = field(default_factory=dict)  # by lower-case name
    objects: dict[tuple[str, str], SchemaObject] = field(default_factory=dict)  # (kind, lower name)

    def table_fingerprints(self) -> dict[str, str]:
        """Table name -> 16 hex chars over its columns, indexes and triggers."""
        out = {}
        for key, table in sorted(self.tables.items()):
            attached = sorted(
                [obj.kind, obj.definition] for obj in self.objects.values() if obj.table.lower() == key and obj.kind != "view"
            )
            columns = [[c.name, c.type, c.notnull, c.default, c.pk, c.hidden] for c in table.columns]
            text = json.dumps([columns, table.without_rowid, table.strict, attached], separators=(",", ":"))
            out[table.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return out

    def view_fingerprints(self) -> dict[str, str]:
        return {
            obj.name: hashlib.sha256(obj.definition.encode()).hexdigest()[:16]
            for obj in self.objects.values()
            if obj.kind == "view"
        }


def normalize_sql(sql: str) -> str:
    """Whitespace-insensitive form of a stored CREATE statement (SQLite keeps the text as written)."""
    return _SPACE.sub(" ", sql.strip()).rstrip(";").strip()


def read_shape(conn: sqlite3.Connection) -> SchemaShape:
    """The user's schema in `conn`'s main database."""
    tables: dict[str, Table] = {}
    listed = conn.execute("PRAGMA main.table_list").fetchall()
    for schema_name, name, kind, _ncol, without_rowid, strict in listed:
        if schema_name != "main" or kind != "table" or is_internal_name(name):
            continue
        sql = conn.execute("SELECT sql FROM main.sqlite_schema WHERE type = 'table' AND name = ?", (name,)).fetchone()
        if sql is None or sql[0] is None or sql[0].upper().startswith("CREATE VIRTUAL"):
            continue
        info = conn.execute("PRAGMA main.table_xinfo(" + quote_ident(name) + ")").fetchall()
        columns = tuple(
            Column(col_name, (decl or "").strip(), bool(notnull), default, pk, hidden)
            for _cid, col_name, decl, notnull, default, pk, hidden in info
        )
        tables[name.lower()] = Table(name, columns, bool(without_rowid), bool(strict), sql[0])
    objects: dict[tuple[str, str], SchemaObject] = {}
    rows = conn.execute(
        "SELECT type, name, tbl_name, sql FROM main.sqlite_schema WHERE type IN ('index', 'view', 'trigger')"
    ).fetchall()
    for kind, name, table, sql in rows:
        if sql is None or is_internal_name(name) or is_internal_name(table):
            continue  # automatic indexes (UNIQUE, PRIMARY KEY) and replication bookkeeping
        objects[(kind, name.lower())] = SchemaObject(kind, name, table, sql)
    return SchemaShape(tables, objects)
