"""Adding a declared column to an existing table: the statement, or why SQLite cannot do it.

The column is added with its whole declared definition (type, NOT NULL, DEFAULT, COLLATE,
CHECK, REFERENCES, a VIRTUAL generated expression), cut from the declared CREATE TABLE text
(`columns.py`). What `ALTER TABLE … ADD COLUMN` refuses is named here, before anything runs, so
`plan` shows it as an incompatible change and `apply` refuses it rather than adding the column
without part of its declaration. SQLite refuses some of these only when the table has rows; the
plan does not depend on the rows, so they are refused always.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing

from marmot_appliance.replication.sqlite_util import quote_ident

from .columns import ColumnDefinition
from .shape import Column

GENERATED_STORED = 3  # table_xinfo's `hidden` for a STORED generated column (2: VIRTUAL)


def _default_is_constant(default: str) -> bool:
    """Whether SQLite accepts `DEFAULT <default>` when adding a column to a table with rows:
    asked of SQLite itself, on a scratch table, since its rule (a literal, possibly signed, cast
    or parenthesized; not CURRENT_TIMESTAMP, not an expression) is its own code's."""
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        conn.execute("CREATE TABLE probe (x)")
        conn.execute("INSERT INTO probe VALUES (1)")
        try:
            conn.execute(f"ALTER TABLE probe ADD COLUMN y DEFAULT {default}")
        except sqlite3.Error:
            return False
    return True


def add_column_problem(column: Column, declared: ColumnDefinition) -> str | None:
    """Why ALTER TABLE ADD COLUMN cannot add this column as declared (None: it can)."""
    if column.pk or "PRIMARY" in declared.keywords:
        return "a primary-key column cannot be added to an existing table"
    if "UNIQUE" in declared.keywords:
        return ("a UNIQUE column cannot be added to an existing table; declare it without UNIQUE "
                "and add a CREATE UNIQUE INDEX on it")
    if column.hidden == GENERATED_STORED:
        return "a STORED generated column cannot be added to an existing table (a VIRTUAL one can)"
    if column.hidden:
        return None  # a VIRTUAL generated column: no default; SQLite checks its NOT NULL on the rows
    default = declared.default
    if default is not None and default.strip("() \t\n").upper() == "NULL":
        default = None  # DEFAULT NULL is no default to SQLite
    if column.notnull and default is None:
        return "a NOT NULL column needs a non-NULL DEFAULT to be added to an existing table"
    if default is not None and not _default_is_constant(default):
        return f"a column with the non-constant default {default} cannot be added to an existing table"
    if "REFERENCES" in declared.keywords and default is not None:
        return ("a REFERENCES column needs DEFAULT NULL to be added to an existing table "
                "(SQLite's rule when foreign keys are enforced)")
    return None


def add_column_sql(table: str, column: Column, declared: ColumnDefinition) -> str:
    statement = f"ALTER TABLE {quote_ident(table)} ADD COLUMN {quote_ident(column.name)}"
    return f"{statement} {declared.definition}" if declared.definition else statement
