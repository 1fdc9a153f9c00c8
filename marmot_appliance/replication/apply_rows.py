"""Write a batch's rows inside the applier's open transaction: versions first, then the winners.

All version records of a batch go in first, so the versions tables name each key's winner, then
exactly the rows that won are applied, each guarded by "the versions table holds my (version,
origin)" (applier.py, steps 3 and 4). Rows of a missing table or column are parked, rows from
beyond the allowed clock skew held (parked_rows.py); a row SQLite refuses is retried on its own,
its UNIQUE collision settled (unique_collisions.py) or the row dead-lettered.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from marmot_appliance.replication.apply_plan import RowPlan, RowPlanner, Shape, set_table_sql, version_of
from marmot_appliance.replication.apply_transaction import ApplyOutcome, ApplyTransaction
from marmot_appliance.replication.codec import GroupedBatch
from marmot_appliance.replication.parked_rows import HeldEntry, ParkedEntry, ParkedRows, encode_parked_change
from marmot_appliance.replication.sqlite_util import is_busy_error, is_environment_error, rollback_to_savepoint
from marmot_appliance.replication.types import RowChange
from marmot_appliance.replication.unique_collisions import settle_unique_collision

# A group of a GroupedBatch to apply: (plan, rows to record versions of, rows to apply).
GroupWork = tuple[RowPlan, list[list[Any]], list[list[Any]]]


class RowWriter:
    """Applies rows of one batch at a time through the plans; one connection, one caller."""

    # Row groups go through their plans' set statements (RowPlan.set_*_sql): one executemany
    # loads a group into a temporary table, and the versions upsert and the row statement run
    # once each over it. False: one executemany per statement, as before (tests compare both).
    set_based = True

    def __init__(self, tx: ApplyTransaction, planner: RowPlanner, parked: ParkedRows) -> None:
        self._tx = tx
        self._planner = planner
        self._parked = parked

    def apply_rows(self, rows: Sequence[RowChange], outcome: ApplyOutcome, stream: str, seq: int) -> None:
        """Apply one batch's rows (inside the open transaction), parking/ignoring as planned."""
        conn = self._tx.conn
        plans = self._planner.plans
        # shape -> (plan, version params, apply params)
        groups: dict[Shape, tuple[RowPlan, list[tuple[Any, ...]], list[tuple[Any, ...]]]] = {}
        planned: list[tuple[RowChange, RowPlan]] = []
        parked: list[ParkedEntry] = []
        held: list[HeldEntry] = []
        limits = self._tx.limits
        newest = 0
        for row in rows:
            shape = (row.table, row.columns, row.op)
            plan = plans.get(shape)
            if plan is None:
                plan = self._planner.plan(row)
            if len(row.values) != len(row.columns):
                self._tx.dead_letter_row(
                    stream, seq, encode_parked_change(row), f"malformed row for {row.table!r}: {len(row.columns)} columns but {len(row.values)} values"
                )
                outcome.rows_rejected += 1
                continue
            if plan.action == "ignore":
                outcome.rows_ignored += 1
                continue
            version = row.version
            if version > limits.hold_above:
                if self._parked.hold_or_reject(row, stream, seq, held):
                    continue
                outcome.rows_rejected += 1
                continue
            if plan.action == "park":
                parked.append((row.table, plan.reason, encode_parked_change(row), stream, seq, time.time()))
                continue
            if version > newest:
                newest = version
            group = groups.get(shape)
            if group is None:
                group = groups[shape] = (plan, [], [])
            group[1].append((*plan.key_of(row.values), version, row.origin, plan.deleted, self._tx.tombstone_horizon))
            group[2].append((*row.values, version, row.origin))
            planned.append((row, plan))
        if parked or held:
            self._parked.store(parked, held, outcome)
        outcome.max_version = max(outcome.max_version, newest)
        if not groups:
            return
        conn.execute("SAVEPOINT marmot_batch")
        try:
            won = 0
            # All version records first: afterwards the versions tables name each key's winner,
            # also when one batch carries the same key twice (or two keys equal under NOCASE).
            for plan, version_params, _ in groups.values():
                won += max(conn.executemany(plan.versions_sql, version_params).rowcount, 0)
            for plan, _, apply_params in groups.values():
                conn.executemany(plan.apply_sql, apply_params)
        except sqlite3.Error as exc:
            rollback_to_savepoint(conn, "marmot_batch", exc)
            if is_busy_error(exc) or is_environment_error(exc):
                raise
            # Some row broke a constraint: go row by row so only the culprits are set aside.
            self.apply_one_by_one(planned, outcome, stream, seq)
            return
        conn.execute("RELEASE marmot_batch")
        outcome.rows_applied += won
        outcome.rows_stale += len(planned) - won

    def apply_groups(self, batch: GroupedBatch, outcome: ApplyOutcome, stream: str, seq: int) -> None:
        """Apply a GroupedBatch (inside the open transaction): per row group, one executemany
        loads its rows into the set table of their width, then the versions upsert and the row
        statement run once each over that table (RowPlan.set_*_sql), row by row in the group's
        order, exactly as an executemany of the per-row statements would.

        Same statements and guarantees as apply_rows; the row lists go to SQLite as they came
        out of the decoder. Rare cases (parked tables, a constraint error) take the per-row path.
        """
        conn = self._tx.conn
        work: list[GroupWork] = []
        hold_above = self._tx.limits.hold_above
        tombstone_horizon = self._tx.tombstone_horizon
        for group in batch.groups:
            plan = self._planner.plan_for(group.table, group.columns, group.op)
            if plan.action == "apply":
                row_version = version_of(len(group.columns))
                newest = max(map(row_version, group.params))
                if newest > hold_above:
                    # A row from beyond the allowed clock skew (rare): the per-row path holds it.
                    self.apply_rows(group.row_changes(), outcome, stream, seq)
                    continue
                recorded = group.params
                if min(map(row_version, recorded)) <= tombstone_horizon:
                    # Rows at or below the tombstone horizon are stale: their versions are not
                    # recorded (the row upsert's guard still sees what the table holds).
                    recorded = [params for params in recorded if row_version(params) > tombstone_horizon]
                work.append((plan, recorded, group.params))
                if newest > outcome.max_version:
                    outcome.max_version = newest
            elif plan.action == "park":
                self.apply_rows(group.row_changes(), outcome, stream, seq)
            else:
                outcome.rows_ignored += len(group.params)
        if not work:
            return
        conn.execute("SAVEPOINT marmot_batch")
        try:
            won = total = 0
            unguarded: list[bool] = []
            # The set table of each width and the row list it holds now (loads in this savepoint).
            loaded: dict[int, list[list[Any]]] = {}
            # All version records first (see apply_rows), then the rows that won.
            for plan, recorded, params in work:
                if not recorded:
                    group_won = 0
                elif plan.set_versions_sql and self.set_based:
                    self._load_set(conn, loaded, plan.width, recorded)
                    group_won = max(conn.execute(plan.set_versions_sql).rowcount, 0)
                else:
                    group_won = max(conn.executemany(plan.grouped_versions_sql, recorded).rowcount, 0)
                won += group_won
                total += len(params)
                unguarded.append(group_won == len(params) and self.keys_unique(plan, params, work))
            for (plan, _, params), bare in zip(work, unguarded):
                if plan.set_versions_sql and self.set_based:
                    self._load_set(conn, loaded, plan.width, params)
                    conn.execute(plan.set_unguarded_sql if bare else plan.set_apply_sql)
                else:
                    conn.executemany(plan.unguarded_sql if bare else plan.apply_sql, params)
        except sqlite3.Error as exc:
            rollback_to_savepoint(conn, "marmot_batch", exc)
            if is_busy_error(exc) or is_environment_error(exc):
                raise
            planned: list[tuple[RowChange, RowPlan]] = []
            for group in batch.groups:
                plan = self._planner.plan_for(group.table, group.columns, group.op)
                if plan.action == "apply":
                    planned.extend((row, plan) for row in group.row_changes())
            self.apply_one_by_one(planned, outcome, stream, seq)
            return
        conn.execute("RELEASE marmot_batch")
        outcome.rows_applied += won
        outcome.rows_stale += total - won

    @staticmethod
    def _load_set(
        conn: sqlite3.Connection, loaded: dict[int, list[list[Any]]], width: int, rows: list[list[Any]]
    ) -> None:
        """Make the set table of `width` hold exactly `rows`, in their order (rowids ascending).

        `loaded` is the caller's record of what each set table holds since its savepoint began:
        a list already loaded is not loaded again. The table is created on first use (in the
        savepoint, so a rollback may drop it again: hence IF NOT EXISTS once per savepoint).
        """
        if loaded.get(width) is rows:
            return
        sql = set_table_sql(width)
        if width not in loaded:
            conn.execute(sql.create)
        conn.execute(sql.clear)
        conn.executemany(sql.load, rows)
        loaded[width] = rows

    @staticmethod
    def keys_unique(plan: RowPlan, params: list[list[Any]], work: list[GroupWork]) -> bool:
        """Whether every row of a group whose versions upsert all won still holds its key's record.

        Each row then wrote its own (version, origin) into the versions table, and only a later
        row of the same key in this batch could have replaced it: none when the group's keys are
        distinct and no other group of the batch goes to the same table. Then the guard of the
        row statement holds for every row and can be left out (plan.unguarded_sql).
        """
        if not plan.unguarded_sql or sum(1 for other, _, _ in work if other.table == plan.table) != 1:
            return False
        keys = list(map(plan.grouped_key, params))
        return len(set(keys)) == len(keys)

    def apply_one_by_one(
        self,
        planned: list[tuple[RowChange, RowPlan]],
        outcome: ApplyOutcome,
        stream: str | None = None,
        seq: int | None = None,
    ) -> None:
        conn = self._tx.conn
        for row, plan in planned:
            conn.execute("SAVEPOINT marmot_row")
            try:
                won = max(
                    conn.execute(
                        plan.versions_sql,
                        (*plan.key_of(row.values), row.version, row.origin, plan.deleted, self._tx.tombstone_horizon),
                    ).rowcount,
                    0,
                )
                conn.execute(plan.apply_sql, (*row.values, row.version, row.origin))
            except sqlite3.Error as exc:
                rollback_to_savepoint(conn, "marmot_row", exc)
                if is_busy_error(exc) or is_environment_error(exc):
                    raise
                if (
                    isinstance(exc, sqlite3.IntegrityError)
                    and "UNIQUE constraint failed" in str(exc)
                    and not plan.deleted
                    and settle_unique_collision(self._tx, row, plan, outcome)
                ):
                    continue
                self._tx.dead_letter_row(
                    stream, seq, encode_parked_change(row), f"row rejected by SQLite on {plan.table!r}: {exc}"
                )
                outcome.rows_rejected += 1
                continue
            conn.execute("RELEASE marmot_row")
            outcome.rows_applied += won
            outcome.rows_stale += 1 - won
            outcome.max_version = max(outcome.max_version, row.version)
