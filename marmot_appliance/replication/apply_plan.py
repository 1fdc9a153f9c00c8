"""How the applier writes rows of one shape (table, columns, op): the statements, built once.

A plan says whether rows of that shape are applied, parked (the table or a column is missing here)
or ignored (the table is not selected, or has no primary key here), and for applied rows holds the
versions-table upsert and the row statement (applier.py, steps 3 and 4). RowPlanner keeps the
plans of the current schema and drops them when the schema changes.
"""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.introspect import TableLayout, table_layout, user_tables
from marmot_appliance.replication.sqlite_util import quote_ident, schema_version
from marmot_appliance.replication.trigger_guard import AppTriggerGuard
from marmot_appliance.replication.types import BOOKKEEPING_PREFIX, RowChange
from marmot_appliance.spec.model import TableSelection

PlanAction = Literal["apply", "park", "ignore"]
# A row's values (RowChange.values) or a grouped row ([*values, version, origin]) -> its key.
KeyOf = Callable[[Sequence[Any]], tuple[Any, ...]]
GroupedKeyOf = Callable[[Sequence[Any]], Any]
# table -> its local layout signature (fingerprint or None when missing, selected or not).
TableSignature = tuple[str | None, bool]
# (table, columns, op): rows of one shape share a plan.
Shape = tuple[str, tuple[str, ...], str]


def _no_key(values: Sequence[Any]) -> tuple[Any, ...]:
    raise TypeError("rows of a park or ignore plan have no key here")


@dataclass(frozen=True)
class RowPlan:
    """How rows of one (table, columns, op) shape are applied; computed once per shape."""

    action: PlanAction
    reason: str = ""
    table: str = ""  # the local table's real name
    versions_sql: str = ""
    apply_sql: str = ""
    key_of: KeyOf = field(default=_no_key)  # values -> tuple of key values in local primary-key order
    deleted: int = 0
    # The versions upsert over a GroupedBatch row ([*values, version, origin], numbered params).
    grouped_versions_sql: str = ""
    # The row statement without the "versions table holds my version" guard, over the same
    # parameters, for a group whose every row won (see RowWriter.apply_groups); "" when not allowed.
    unguarded_sql: str = ""
    grouped_key: GroupedKeyOf = field(default=_no_key)  # grouped row -> its key (a value, or a tuple)
    # The same three statements as one statement each over the group's rows loaded into the set
    # table of their width (set_table; RowWriter.apply_groups): "" when rows this wide cannot
    # have a set table (SQLite's column limit), and the group takes the executemany form.
    width: int = 0  # of a grouped row: the columns, then version and origin
    set_versions_sql: str = ""
    set_apply_sql: str = ""
    set_unguarded_sql: str = ""  # "" exactly when unguarded_sql is ""


class _VersionGetters(dict[int, Callable[[Sequence[Any]], int]]):
    """width -> itemgetter of a grouped row's version ([*values, version, origin])."""

    def __missing__(self, width: int) -> Callable[[Sequence[Any]], int]:
        getter = self[width] = operator.itemgetter(width)
        return getter


_VERSION_OF = _VersionGetters()


def version_of(width: int) -> Callable[[Sequence[Any]], int]:
    """The getter of a grouped row's version, for rows of `width` columns (cached)."""
    return _VERSION_OF[width]


# The set tables: one temporary table per row width on the applier's connection, untyped
# columns p1 .. pN (a value keeps the storage class it was bound with), loaded with a row group
# in its order; its statements read it as SET_ALIAS and the rowid gives that order.
SET_ALIAS = '"src"'
SET_ORDER = f"{SET_ALIAS}.rowid"


def set_table(width: int) -> str:
    return f"temp.{quote_ident(f'{BOOKKEEPING_PREFIX}set_{width}')}"


def set_ref(param: int) -> str:
    """The set table's column for the numbered parameter ?param of the per-row statements.

    The unary + makes it an expression without affinity, as a bound parameter is: compared with
    a table column, the column's affinity applies to it exactly as to ?param (a bare column
    reference of an untyped table has BLOB affinity and would compare '5' and 5 unconverted).
    It still counts as a column for collation, with precedence to the left operand: every
    comparison keeps the table's column on the left, so that column's collation applies.
    """
    return f"+{SET_ALIAS}.{quote_ident(f'p{param}')}"


@dataclass(frozen=True)
class SetTableSql:
    create: str
    clear: str
    load: str


class _SetTables(dict[int, SetTableSql]):
    def __missing__(self, width: int) -> SetTableSql:
        table = set_table(width)
        columns = ", ".join(quote_ident(f"p{i + 1}") for i in range(width))
        sql = self[width] = SetTableSql(
            f"CREATE TEMP TABLE IF NOT EXISTS {table} ({columns})",
            f"DELETE FROM {table}",
            f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * width)})",
        )
        return sql


_SET_TABLES = _SetTables()


def set_table_sql(width: int) -> SetTableSql:
    """The statements that create, clear and load the set table of rows `width` wide (cached)."""
    return _SET_TABLES[width]


def _single_key(index: int) -> KeyOf:
    def key_of(values: Sequence[Any]) -> tuple[Any, ...]:
        return (values[index],)

    return key_of


class RowPlanner:
    """The plans for the database's current schema; one connection, used inside its transactions."""

    def __init__(self, conn: sqlite3.Connection, selection: TableSelection, trigger_guard: AppTriggerGuard) -> None:
        self._conn = conn
        self._selection = selection
        self._trigger_guard = trigger_guard
        self.schema_version: int | None = None
        self._layouts: dict[str, TableLayout] = {}  # lower-case name -> layout
        self.plans: dict[Shape, RowPlan] = {}
        self._versions_ready: set[str] = set()
        # Rows wider than this get no set table (a table has at most this many columns).
        self._max_set_width = conn.getlimit(sqlite3.SQLITE_LIMIT_COLUMN)

    def forget_schema(self) -> None:
        """The file was replaced: re-read its schema on the next refresh."""
        self.schema_version = None

    def refresh(self) -> None:
        version = schema_version(self._conn)
        if version == self.schema_version:
            return
        self._layouts = {}
        for name in user_tables(self._conn):
            layout = table_layout(self._conn, name)
            if layout is not None:
                self._layouts[name.lower()] = layout
        self._trigger_guard.set_replicated(
            layout.name for layout in self._layouts.values()
            if layout.primary_key and self._selection.selects(layout.name)
        )
        self.plans = {}
        self._versions_ready = set()
        self.schema_version = version

    def table_signature(self, table: str) -> TableSignature:
        layout = self._layouts.get(table.lower())
        if layout is None:
            return (None, self._selection.selects(table))
        return (layout.fingerprint, self._selection.selects(layout.name))

    def plan(self, row: RowChange) -> RowPlan:
        return self.plan_for(row.table, row.columns, row.op)

    def plan_for(self, table: str, columns: tuple[str, ...], op: str) -> RowPlan:
        shape = (table, columns, op)
        plan = self.plans.get(shape)
        if plan is None:
            plan = self.plans[shape] = self._make_plan(table, columns, op)
        return plan

    def _make_plan(self, table_name: str, row_columns: tuple[str, ...], op: str) -> RowPlan:
        layout = self._layouts.get(table_name.lower())
        if layout is None:
            if not self._selection.selects(table_name):
                return RowPlan("ignore")
            return RowPlan("park", reason=f"table {table_name!r} does not exist here")
        if not self._selection.selects(layout.name):
            return RowPlan("ignore")
        if not layout.primary_key:
            return RowPlan("ignore", reason=f"table {layout.name!r} has no primary key here")
        local_columns = {col.lower(): col for col in layout.columns}
        incoming = [col.lower() for col in row_columns]
        missing = [col for col, low in zip(row_columns, incoming) if low not in local_columns]
        if missing:
            return RowPlan("park", reason=f"table {layout.name!r} lacks column(s) {', '.join(map(repr, missing))}")
        try:
            key_positions = [incoming.index(col.lower()) for col in layout.primary_key]
        except ValueError:
            return RowPlan("park", reason=f"the change does not carry the primary key {layout.primary_key} of {layout.name!r}")
        if len(set(incoming)) != len(incoming):
            return RowPlan("park", reason=f"the change names a column of {layout.name!r} twice")
        if layout.name not in self._versions_ready:
            if bk.ensure_versions_table(self._conn, layout):
                # Our own DDL: do not treat it as a schema change that invalidates the plans.
                self.schema_version = schema_version(self._conn)
            self._versions_ready.add(layout.name)

        n = len(row_columns)
        version_param, origin_param = n + 1, n + 2
        key_params = [p + 1 for p in key_positions]
        winner = bk.recorded_version_sql(layout.name, key_params, version_param, origin_param)
        # The unguarded statements name the version and origin parameters in a condition that
        # always holds (both are integers: the decoder checks), only because sqlite3 requires
        # every parameter of a row to be numbered in the statement.
        always = f"?{version_param} IS NOT NULL AND ?{origin_param} IS NOT NULL"
        table = quote_ident(layout.name)
        # The set forms: the same statements over the group's rows in the set table, in their
        # order (set_ref: each ?N becomes the column pN, compared exactly as the parameter).
        width = n + 2
        source = f"{set_table(width)} AS {SET_ALIAS}"
        key_refs = [set_ref(p) for p in key_params]
        set_winner = bk.recorded_version_condition(layout.name, key_refs, set_ref(version_param), set_ref(origin_param))
        if op == "delete":
            match = " AND ".join(f"{quote_ident(col)} = ?{p}" for col, p in zip(layout.primary_key, key_params))
            apply_sql = f"DELETE FROM {table} WHERE {match} AND {winner}"
            unguarded_sql = f"DELETE FROM {table} WHERE {match} AND {always}"
            # The key columns on the left: their affinity and collation apply, as in `match`.
            key_tuple = f"({', '.join(quote_ident(col) for col in layout.primary_key)})"
            set_apply_sql = (
                f"DELETE FROM {table} WHERE {key_tuple} IN "
                f"(SELECT {', '.join(key_refs)} FROM {source} WHERE {set_winner})"
            )
            set_unguarded_sql = f"DELETE FROM {table} WHERE {key_tuple} IN (SELECT {', '.join(key_refs)} FROM {source})"
            deleted = 1
        else:
            targets = ", ".join(quote_ident(local_columns[col]) for col in incoming)
            params = ", ".join(f"?{i + 1}" for i in range(n))
            key_set = {col.lower() for col in layout.primary_key}
            # Under a key collation other than BINARY ('alice' and 'Alice' are one key under
            # NOCASE) the conflict must also take the incoming key's spelling, or a case-only
            # rename never lands. With BINARY keys a conflict means the same key: leave it be
            # (rewriting a key column costs an index update per row).
            respell_key = any(collation.upper() != "BINARY" for collation in layout.pk_collations)
            updates = [f"{quote_ident(local_columns[col])} = excluded.{quote_ident(local_columns[col])}"
                       for col in incoming if respell_key or col not in key_set]
            # An upsert is a full row image: a column the writer's schema did not have yet (a
            # rolling ADD COLUMN) takes its default here too, as it does on the writer once it
            # migrates, so every node ends with the same row (docs/capture.md).
            carried = set(incoming)
            updates += [f"{quote_ident(col)} = ({default if default is not None else 'NULL'})"
                        for col, default in zip(layout.columns, layout.defaults or [None] * len(layout.columns))
                        if col.lower() not in carried]
            conflict = ", ".join(quote_ident(col) for col in layout.primary_key)
            on_conflict = f"DO UPDATE SET {', '.join(updates)}" if updates else "DO NOTHING"
            # INSERT ... SELECT needs a WHERE before ON CONFLICT (SQLite's upsert parsing rule);
            # ours is the version guard. Never INSERT OR REPLACE: it deletes rows on other
            # UNIQUE conflicts, resets absent columns and changes rowids.
            apply_sql = (
                f"INSERT INTO {table} ({targets}) SELECT {params} WHERE {winner} "
                f"ON CONFLICT ({conflict}) {on_conflict}"
            )
            # VALUES, not SELECT: SQLite runs INSERT ... SELECT through a co-routine, which
            # costs more per row than the guard's lookup itself.
            unguarded_sql = (
                f"INSERT INTO {table} ({targets}) VALUES ({params}) "
                f"ON CONFLICT ({conflict}) DO UPDATE SET {', '.join(updates)} WHERE {always}"
                if updates else ""
            )
            set_values = ", ".join(set_ref(i + 1) for i in range(n))
            set_apply_sql = (
                f"INSERT INTO {table} ({targets}) SELECT {set_values} FROM {source} WHERE {set_winner} "
                f"ORDER BY {SET_ORDER} ON CONFLICT ({conflict}) {on_conflict}"
            )
            set_unguarded_sql = (
                f"INSERT INTO {table} ({targets}) SELECT {set_values} FROM {source} WHERE true "
                f"ORDER BY {SET_ORDER} ON CONFLICT ({conflict}) DO UPDATE SET {', '.join(updates)}"
                if updates else ""
            )
            deleted = 0
        if len(key_positions) == 1:
            key_of = _single_key(key_positions[0])
        else:
            key_of = operator.itemgetter(*key_positions)
        # Unguarded apply needs "two rows are one key in the versions table" to imply "equal in
        # Python" (the duplicate check in RowWriter.apply_groups): true for BINARY keys, not NOCASE/RTRIM.
        if any(collation.upper() != "BINARY" for collation in layout.pk_collations):
            unguarded_sql = ""
        if not unguarded_sql:
            set_unguarded_sql = ""
        set_versions_sql = bk.versions_upsert_set_sql(
            layout.name, key_refs, set_ref(version_param), set_ref(origin_param), deleted, source, SET_ORDER
        )
        if width > self._max_set_width:
            set_versions_sql = set_apply_sql = set_unguarded_sql = ""
        return RowPlan(
            "apply",
            table=layout.name,
            versions_sql=bk.versions_upsert_sql(layout.name, len(key_positions)),
            apply_sql=apply_sql,
            key_of=key_of,
            deleted=deleted,
            grouped_versions_sql=bk.versions_upsert_numbered_sql(
                layout.name, key_params, version_param, origin_param, deleted
            ),
            unguarded_sql=unguarded_sql,
            grouped_key=operator.itemgetter(*key_positions),
            width=width,
            set_versions_sql=set_versions_sql,
            set_apply_sql=set_apply_sql,
            set_unguarded_sql=set_unguarded_sql,
        )
