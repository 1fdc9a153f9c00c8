"""Compare the declared schema with one database: what `plan` shows and `apply` does.

Each difference is one `SchemaChange`:

  +  something to create: a table, a column (ALTER TABLE ADD COLUMN), an index, view or trigger
  ~  an index, view or trigger whose definition changed: dropped and re-created (they hold no data)
  !  an incompatible change (a column's type, NOT NULL, default or key; a column the schema no
     longer declares; a table's key or WITHOUT ROWID/STRICT): never done, needs a manual migration
  ?  a table, index, view or trigger the database has and the schema files do not: kept

Only `+` and `~` carry SQL. Nothing here ever drops a table or a column.
"""

from __future__ import annotations

from dataclasses import dataclass

from marmot_appliance.replication.sqlite_util import quote_ident

from .shape import Column, SchemaShape, Table

MANUAL = "needs a manual migration"
_NON_CONSTANT_DEFAULTS = ("CURRENT_TIME", "CURRENT_DATE", "CURRENT_TIMESTAMP")


@dataclass(frozen=True)
class SchemaChange:
    symbol: str  # "+", "~", "!" or "?"
    kind: str  # table, column, index, view, trigger
    name: str  # "orders", "notes.tag"
    detail: str = ""
    statements: tuple[str, ...] = ()

    @property
    def additive(self) -> bool:
        return self.symbol in ("+", "~")

    @property
    def incompatible(self) -> bool:
        return self.symbol == "!"

    def render(self) -> str:
        text = f"{self.symbol} {self.kind} {self.name}"
        return f"{text}: {self.detail}" if self.detail else text

    def to_dict(self) -> dict:
        return {"symbol": self.symbol, "kind": self.kind, "name": self.name, "detail": self.detail,
                "statements": list(self.statements)}


def _add_column_problem(column: Column) -> str | None:
    """Why ALTER TABLE ADD COLUMN cannot add this column as declared (SQLite's own limits)."""
    if column.pk:
        return "a primary-key column cannot be added to an existing table"
    if column.hidden in (2, 3):
        return "a generated column cannot be added from the schema files"
    default = (column.default or "").strip()
    if column.notnull and default.upper() in ("", "NULL"):
        return "a NOT NULL column needs a non-NULL DEFAULT to be added to an existing table"
    if default.upper() in _NON_CONSTANT_DEFAULTS or default.startswith("("):
        return f"a column with the non-constant default {default} cannot be added to an existing table"
    return None


def add_column_sql(table: str, column: Column) -> str:
    parts = [f"ALTER TABLE {quote_ident(table)} ADD COLUMN {quote_ident(column.name)}"]
    if column.type:
        parts.append(column.type)
    if column.notnull:
        parts.append("NOT NULL")
    if column.default is not None:
        parts.append(f"DEFAULT {column.default}")
    return " ".join(parts)


def _column_differences(declared: Column, actual: Column) -> list[str]:
    out = []
    if declared.type.upper() != actual.type.upper():
        out.append(f"type change {actual.type or '(none)'} -> {declared.type or '(none)'} not supported")
    if declared.notnull != actual.notnull:
        out.append(f"NOT NULL {'added' if declared.notnull else 'removed'}: not supported")
    if declared.default != actual.default:
        out.append(f"default change {actual.default} -> {declared.default} not supported")
    if declared.hidden != actual.hidden:
        out.append("generated/stored change not supported")
    return out


def _table_changes(declared: Table, actual: Table) -> list[SchemaChange]:
    changes: list[SchemaChange] = []
    if declared.primary_key != actual.primary_key:
        changes.append(SchemaChange(
            "!", "table", declared.name,
            f"primary key change ({', '.join(actual.primary_key)}) -> ({', '.join(declared.primary_key)}) "
            f"not supported ({MANUAL})",
        ))
    for attribute in ("without_rowid", "strict"):
        if getattr(declared, attribute) != getattr(actual, attribute):
            label = attribute.replace("_", " ").upper()
            changes.append(SchemaChange("!", "table", declared.name, f"{label} change not supported ({MANUAL})"))
    for column in declared.columns:
        name = f"{declared.name}.{column.name}"
        existing = actual.column(column.name)
        if existing is None:
            problem = _add_column_problem(column)
            if problem:
                changes.append(SchemaChange("!", "column", name, f"{problem} ({MANUAL})"))
            else:
                changes.append(SchemaChange("+", "column", name, "", (add_column_sql(actual.name, column),)))
            continue
        for difference in _column_differences(column, existing):
            changes.append(SchemaChange("!", "column", name, f"{difference} ({MANUAL})"))
    for column in actual.columns:
        if declared.column(column.name) is None:
            changes.append(SchemaChange(
                "!", "column", f"{actual.name}.{column.name}",
                f"in the database but not in the schema files: dropping or renaming a column is not supported ({MANUAL})",
            ))
    return changes


def diff_schema(declared: SchemaShape, actual: SchemaShape) -> list[SchemaChange]:
    """Every difference, in the order `apply` runs them: tables, columns, then the other objects
    in declaration order (a view or trigger may use what comes before it)."""
    changes: list[SchemaChange] = []
    for key, table in declared.tables.items():
        existing = actual.tables.get(key)
        if existing is None:
            changes.append(SchemaChange("+", "table", table.name, "", (table.sql,)))
        else:
            changes += _table_changes(table, existing)
    for key, obj in declared.objects.items():
        existing = actual.objects.get(key)
        if existing is None:
            changes.append(SchemaChange("+", obj.kind, obj.name, "", (obj.sql,)))
        elif existing.definition != obj.definition:
            drop = f"DROP {obj.kind.upper()} {quote_ident(existing.name)}"
            changes.append(SchemaChange("~", obj.kind, obj.name, "definition changed: re-created", (drop, obj.sql)))
    for key, table in actual.tables.items():
        if key not in declared.tables:
            changes.append(SchemaChange("?", "table", table.name, "not in the schema files (kept)"))
    for key, obj in actual.objects.items():
        if key not in declared.objects:
            changes.append(SchemaChange("?", obj.kind, obj.name, "not in the schema files (kept)"))
    return changes
