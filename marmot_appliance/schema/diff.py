"""Compare the declared schema with one database: what `plan` shows and `apply` does.

Each difference is one `SchemaChange`:

  +  something to create: a table, a column (ALTER TABLE ADD COLUMN with its whole declared
     definition, add_column.py), an index, view or trigger
  ~  an index, view or trigger whose definition changed: dropped and re-created (they hold no data)
  !  an incompatible change (a column's type, NOT NULL, default, key, COLLATE, CHECK, REFERENCES,
     UNIQUE or generated expression; a column the schema no longer declares; a new column ADD
     COLUMN cannot add as declared, e.g. UNIQUE; a table's key, WITHOUT ROWID/STRICT or
     UNIQUE/CHECK/FOREIGN KEY table constraints): never done, needs a manual migration
  ?  a table, index, view or trigger the database has and the schema files do not: kept

Only `+` and `~` carry SQL. Nothing here ever drops a table or a column.
"""

from __future__ import annotations

from dataclasses import dataclass

from marmot_appliance.replication.sqlite_util import quote_ident

from .add_column import add_column_problem, add_column_sql
from .columns import ColumnDefinition, Constraint, TableDeclaration, read_table
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


Written = tuple[TableDeclaration, TableDeclaration]  # the declared and the database's CREATE TABLE, cut


def _read_both(declared: Table, actual: Table) -> Written | None:
    try:
        return read_table(declared.sql), read_table(actual.sql)
    except SqlTextError:
        return None  # SQLite accepted both texts, so not expected; `_table_constraint_changes` says so


def _constraint_differences(declared: tuple[Constraint, ...], actual: tuple[Constraint, ...]) -> list[str]:
    """"X added" / "Y removed" for the constraints only one side has (compared by their keys)."""
    declared_keys = {constraint.key for constraint in declared}
    actual_keys = {constraint.key for constraint in actual}
    return [f"{c.text} added" for c in declared if c.key not in actual_keys] + [
        f"{c.text} removed" for c in actual if c.key not in declared_keys
    ]


def _table_constraint_changes(table: Table, written: Written | None) -> list[SchemaChange]:
    if written is None:
        return [SchemaChange("!", "table", table.name, f"its CREATE TABLE text could not be read to compare "
                                                        f"the constraints ({MANUAL})")]
    return [
        SchemaChange("!", "table", table.name, f"table constraint {difference}: not supported ({MANUAL})")
        for difference in _constraint_differences(written[0].constraints, written[1].constraints)
    ]


def _written_column_differences(name: str, written: Written | None) -> list[str]:
    """What table_xinfo does not show: a changed COLLATE, CHECK, REFERENCES, UNIQUE or generated expression."""
    if written is None:
        return []
    declared, actual = written[0].columns.get(name.lower()), written[1].columns.get(name.lower())
    if declared is None or actual is None:
        return []
    constraints = _constraint_differences(declared.constraints, actual.constraints)
    return [f"{', '.join(constraints)}: not supported"] if constraints else []


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
    written = _read_both(declared, actual)
    changes += _table_constraint_changes(declared, written)
    for column in declared.columns:
        name = f"{declared.name}.{column.name}"
        existing = actual.column(column.name)
        if existing is None:
            changes.append(_new_column_change(declared, actual, column, written[0].columns if written else {}))
            continue
        differences = _column_differences(column, existing) or _written_column_differences(column.name, written)
        for difference in differences:
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
    for object_key, obj in declared.objects.items():
        existing_object = actual.objects.get(object_key)
        if existing_object is None:
            changes.append(SchemaChange("+", obj.kind, obj.name, "", (obj.sql,)))
        elif existing_object.definition != obj.definition:
            drop = f"DROP {obj.kind.upper()} {quote_ident(existing_object.name)}"
            changes.append(SchemaChange("~", obj.kind, obj.name, "definition changed: re-created", (drop, obj.sql)))
    for key, table in actual.tables.items():
        if key not in declared.tables:
            changes.append(SchemaChange("?", "table", table.name, "not in the schema files (kept)"))
    for object_key, obj in actual.objects.items():
        if object_key not in declared.objects:
            changes.append(SchemaChange("?", obj.kind, obj.name, "not in the schema files (kept)"))
    return changes
