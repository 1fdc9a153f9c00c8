"""Small helpers shared by the schema tests: real SQLite files and declared schema files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from marmot_appliance.schema.migrate import IncompatibleSchemaError, declared_schema, migrate_database
from marmot_appliance.schema.shape import SchemaShape


def make_db(path: Path, *statements: str) -> Path:
    """A WAL database file at `path` after running `statements`."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


def declare(tmp_path: Path, sql: str) -> SchemaShape:
    """The declared schema of one schema file holding `sql`."""
    path = tmp_path / "declared.sql"
    path.write_text(sql)
    return declared_schema((str(path),))


def schema_rows(path: Path) -> list[tuple]:
    """Every (type, name, sql) of the database's sqlite_schema: equal before and after means unchanged."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT type, name, sql FROM sqlite_schema ORDER BY name").fetchall()
    finally:
        conn.close()


def assert_refused_unchanged(db: Path, declared: SchemaShape, match: str,
                             error: type[Exception] = IncompatibleSchemaError) -> None:
    """apply refuses the declared schema on `db` with a message matching `match`, changing nothing."""
    before = schema_rows(db)
    with pytest.raises(error, match=match):
        migrate_database(db, declared)
    assert schema_rows(db) == before
