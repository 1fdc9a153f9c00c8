"""Compare the declared schema with one database: what `plan` shows and `apply` does.

Each difference is one `SchemaChange`:

  +  something to create: a table, a column (ALTER TABLE ADD COLUMN with its whole declared
     definition, add_column.py), an index, view or trigger
  ~  an index, view or trigger whose definition changed: dropped and re-created (they hold no data)
  !  an incompatible change (a column's type, NOT NULL, default or key; a column the schema no
     longer declares; a new column ADD COLUMN cannot add as declared, e.g. UNIQUE; a table's key
     or WITHOUT ROWID/STRICT): never done, needs a manual migration
  ?  a table, index, view or trigger the database has and the schema files do not: kept

Only `+` and `~` carry SQL. Nothing here ever drops a table or a column.
"""

from __future__ import annotations

from dataclasses import dataclass

from marmot_appliance.replication.sqlite_util import quote_ident

from .add_column import add_column_problem, add_column_sql
from .columns import ColumnDefinition, column_definitions
from .shape import Column, SchemaShape, Table
from .sqltokens import SqlTextError

MANUAL = "needs a manual migration"


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


def _new_column_change(declared: Table, actual: Table, column: Column,
                       definitions: dict[str, ColumnDefinition]) -> SchemaChange:
    """`+` with the ALTER TABLE ADD COLUMN carrying the whole declaration, or `!` saying why not."""
    name = f"{declared.name}.{column.name}"
    definition = definitions.get(column.name.lower())
    if definition is None:
        return SchemaChange("!", "column", name, f"its declaration could not be read from the schema files ({MANUAL})")
    problem = add_column_problem(column, definition)
    if problem:
        return SchemaChange("!", "column", name, f"{problem} ({MANUAL})")
    return SchemaChange("+", "column", name, "", (add_column_sql(actual.name, column, definition),))


def _declared_columns(table: Table) -> dict[str, ColumnDefinition]:
    try:
        return column_definitions(table.sql)
    except SqlTextError:
        return {}  # every new column of it is then a `!`, never added without part of its declaration


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
    definitions: dict[str, ColumnDefinition] | None = None  # cut from the declared text when needed
    for column in declared.columns:
        name = f"{declared.name}.{column.name}"
        existing = actual.column(column.name)
        if existing is None:
            if definitions is None:
                definitions = _declared_columns(declared)
            changes.append(_new_column_change(declared, actual, column, definitions))
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
