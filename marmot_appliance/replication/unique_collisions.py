"""Settle an incoming row that collides with local rows on a UNIQUE index other than its key.

Called by RowWriter (apply_rows.py) when applying a row fails with "UNIQUE constraint failed":
the same last-writer-wins rule as per key, decided from the versions tables, so every node keeps
the same survivor (docs/capture.md, "A UNIQUE collision on another index").
"""

from __future__ import annotations

import sqlite3
from typing import Any

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.apply_plan import RowPlan
from marmot_appliance.replication.apply_transaction import ApplyOutcome, ApplyTransaction
from marmot_appliance.replication.introspect import table_layout, unique_indexes
from marmot_appliance.replication.sqlite_util import (
    is_busy_error,
    is_environment_error,
    quote_ident,
    rollback_to_savepoint,
)
from marmot_appliance.replication.types import RowChange


def settle_unique_collision(tx: ApplyTransaction, row: RowChange, plan: RowPlan, outcome: ApplyOutcome) -> bool:
    """Settle an incoming row that collides with other rows on a non-primary-key UNIQUE index.

    Last writer wins across the colliding keys, as it does per key: if the incoming row is
    newer than every row it collides with, those rows are deleted and tombstoned with the
    incoming version (what `INSERT OR REPLACE` did on the origin, whose trigger-less delete
    never reached the log), then the row is applied. Otherwise the incoming row loses: its
    key is tombstoned with the winner's version and any local row of that key removed (the
    node where it was written does the same when the winner arrives). Every node decides
    from the same versions, so all converge on the same survivor. False when no colliding
    row is found (an index this cannot see: partial, expression, other collation) or the
    retry fails again: the caller dead-letters the row as before.
    """
    conn = tx.conn
    layout = table_layout(conn, plan.table)
    if layout is None:
        return False
    values = {column.lower(): value for column, value in zip(row.columns, row.values)}
    key = tuple(plan.key_of(row.values))
    key_match = " AND ".join(f"{quote_ident(col)} = ?" for col in layout.primary_key)
    colliding: list[tuple[Any, ...]] = []
    for index in unique_indexes(conn, layout.name):
        wanted = [values.get(column.lower()) for column in index.columns]
        if any(value is None for value in wanted):
            continue  # NULLs never collide (and a column the change lacks cannot be matched)
        match = " AND ".join(
            f"{quote_ident(column)} = ? COLLATE {quote_ident(collation)}"
            for column, collation in zip(index.columns, index.collations)
        )
        keys = ", ".join(quote_ident(col) for col in layout.primary_key)
        for found in conn.execute(
            f"SELECT {keys} FROM {quote_ident(layout.name)} WHERE {match} AND NOT ({key_match})",
            (*wanted, *key),
        ):
            if found not in colliding:
                colliding.append(found)
    if not colliding:
        return False
    versions = quote_ident(bk.versions_table_name(layout.name))
    version_match = " AND ".join(f"{quote_ident(bk.key_column(i))} = ?" for i in range(len(key)))
    recorded: list[tuple[int, int]] = []
    for other in colliding:
        found = conn.execute(f"SELECT version, origin FROM {versions} WHERE {version_match}", other).fetchone()
        recorded.append((int(found[0]), int(found[1])) if found else (0, 0))  # never written since replication began
    tombstone_sql = bk.versions_upsert_sql(layout.name, len(key))
    delete_sql = f"DELETE FROM {quote_ident(layout.name)} WHERE {key_match}"
    strongest = max(recorded)
    conn.execute("SAVEPOINT marmot_unique")
    try:
        if (row.version, row.origin) > strongest:
            for other in colliding:
                conn.execute(tombstone_sql, (*other, row.version, row.origin, 1, tx.tombstone_horizon))
                conn.execute(delete_sql, other)
            won = max(conn.execute(plan.versions_sql, (*key, row.version, row.origin, 0, tx.tombstone_horizon)).rowcount, 0)
            conn.execute(plan.apply_sql, (*row.values, row.version, row.origin))
            outcome.rows_applied += won
            outcome.rows_stale += 1 - won
        else:
            conn.execute(tombstone_sql, (*key, *strongest, 1, tx.tombstone_horizon))
            conn.execute(delete_sql, key)
            outcome.rows_stale += 1
    except sqlite3.Error as exc:
        rollback_to_savepoint(conn, "marmot_unique", exc)
        if is_busy_error(exc) or is_environment_error(exc):
            raise
        return False
    conn.execute("RELEASE marmot_unique")
    outcome.max_version = max(outcome.max_version, row.version, strongest[0])
    return True
