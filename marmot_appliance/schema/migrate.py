"""Plan and carry out the declared schema on nodes' databases, additively.

`plan_database` reads a database (read-only) and lists its differences from the declared
schema. `migrate_database` runs the additive ones (`+`, `~`) in one IMMEDIATE transaction: the
differences are computed again inside it, so what runs matches the database at that moment even
if an application changed it since the plan. Incompatible differences (`!`) stop the migration
before anything runs, unless the caller passes `skip_incompatible` — then they are left as they
are (never dropped, never rewritten) and returned for the operator to see.

The node runtime notices the new schema by itself (`PRAGMA schema_version`) and re-installs its
capture triggers; applications and replication keep running meanwhile (docs/schema.md).
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from marmot_appliance.errors import MarmotError

from .diff import SchemaChange, diff_schema
from .shape import SchemaShape, read_shape
from .sqlfiles import DeclaredFiles

BUSY_TIMEOUT_MS = 30_000


class SchemaMigrationError(MarmotError):
    """A database could not be brought to the declared schema (the message says which and why)."""


class IncompatibleSchemaError(SchemaMigrationError):
    """The declared schema needs changes apply never makes (nothing was changed)."""


@dataclass(frozen=True)
class MigrationResult:
    applied: tuple[SchemaChange, ...]
    skipped: tuple[SchemaChange, ...]  # incompatible, left alone (skip_incompatible)


def declared_shape(declared: DeclaredFiles) -> SchemaShape:
    with closing(declared.database()) as conn:
        return read_shape(conn)


def database_shape(path: str | Path) -> SchemaShape:
    """The schema of the database at `path`, read-only; an absent file has an empty schema."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return SchemaShape()
    uri = f"file:{quote(str(path.absolute()))}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)) as conn:
            return read_shape(conn)
    except sqlite3.Error as exc:
        raise SchemaMigrationError(f"cannot read the schema of {path}: {exc}") from exc


def plan_database(declared: SchemaShape, path: str | Path) -> list[SchemaChange]:
    return diff_schema(declared, database_shape(path))


def describe_incompatible(changes: list[SchemaChange]) -> str:
    return "\n".join(f"  {change.render()}" for change in changes if change.incompatible)


def migrate_database(path: str | Path, declared: SchemaShape, skip_incompatible: bool = False) -> MigrationResult:
    """Bring the database at `path` to the declared schema in one transaction (see module doc)."""
    if not Path(path).is_file():
        # Never create it here: apply (or the Ansible role) creates databases in WAL mode.
        raise SchemaMigrationError(f"no database at {path}")
    try:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    except sqlite3.Error as exc:
        raise SchemaMigrationError(f"cannot open {path}: {exc}") from exc
    with closing(conn):
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        try:
            conn.execute("BEGIN IMMEDIATE")  # the write lock first: the schema read below stays true
        except sqlite3.Error as exc:
            raise SchemaMigrationError(f"{path}: cannot take the write lock: {exc}") from exc
        try:
            changes = diff_schema(declared, read_shape(conn))
            incompatible = [change for change in changes if change.incompatible]
            if incompatible and not skip_incompatible:
                raise IncompatibleSchemaError(
                    f"{path}: incompatible schema changes; nothing was changed:\n{describe_incompatible(changes)}"
                )
            applied = [change for change in changes if change.additive]
            for change in applied:
                for statement in change.statements:
                    try:
                        conn.execute(statement)
                    except sqlite3.Error as exc:
                        raise SchemaMigrationError(
                            f"{path}: {change.render()} failed, nothing was changed: {exc} (running: {statement})"
                        ) from exc
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return MigrationResult(tuple(applied), tuple(incompatible))


def declared_schema(schema_files: tuple[str, ...]) -> SchemaShape:
    """The declared schema of a loaded spec (its files are read again: they may have changed)."""
    from marmot_appliance.errors import SpecError
    from marmot_appliance.schema.sqlfiles import read_schema_files

    declared, problems = read_schema_files([(path, Path(path)) for path in schema_files])
    if problems:
        raise SpecError([problem.format() for problem in problems])
    return declared_shape(declared)
