"""Applier: version-checked batches on real SQLite files, positions in the same transaction."""

from __future__ import annotations

import math
import sqlite3
import struct
import time

import pytest

from marmot_appliance.errors import TransientError
from marmot_appliance.replication.applier import BatchApplier, decode_parked_change, reset_own_origin_horizon
from marmot_appliance.replication.capture import ChangeCapture
from marmot_appliance.replication.codec import GroupedBatch, decode_for_apply, encode_batch
from marmot_appliance.replication.digest import table_digest
from marmot_appliance.replication.sqlite_util import DatabaseBusyError
from marmot_appliance.replication.types import DEAD_LETTER_TABLE, ChangeBatch, RowChange
from marmot_appliance.spec.model import TableSelection
from tests.test_capture import EXACT_VALUES

SCHEMA = "CREATE TABLE t (k TEXT PRIMARY KEY, v);"
BASE = 1 << 50  # versions in hand-made batches: far below any real clock value


def connect(path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def up(table, key, value, version, origin, column="v"):
    return RowChange(table, "upsert", (key,), ("k", column), (key, value), version, origin)


def delete(table, key, version, origin):
    return RowChange(table, "delete", (key,), ("k",), (key,), version, origin)


def batch(*rows, origin=None) -> ChangeBatch:
    return ChangeBatch(origin=rows[0].origin if origin is None else origin, rows=tuple(rows))


def rows_of(db, table="t"):
    return dict(connect(db).execute(f'SELECT * FROM "{table}"').fetchall())


def ship(source: ChangeCapture, target: BatchApplier, stream: str, seq: int):
    pending = source.read_pending(100_000)
    outcome = target.apply(ChangeBatch(origin=source.node_id, rows=tuple(p.change for p in pending)), stream, seq)
    source.mark_published([p.log_id for p in pending])
    return outcome


def test_captured_values_arrive_bit_exact_and_are_not_captured_again(wal_db):
    origin_db = wal_db("a.db", "CREATE TABLE v (k TEXT PRIMARY KEY, val);")
    replica_db = wal_db("b.db", "CREATE TABLE v (k TEXT PRIMARY KEY, val);")
    with ChangeCapture(origin_db, 1) as source, ChangeCapture(replica_db, 2) as replica_capture, BatchApplier(
        replica_db, 2
    ) as applier:
        source.install()
        replica_capture.install()
        conn = connect(origin_db)
        conn.executemany("INSERT INTO v VALUES (?, ?)", EXACT_VALUES)
        outcome = ship(source, applier, "s-1", 1)
        assert outcome.rows_applied == len(EXACT_VALUES)
        got = dict(connect(replica_db).execute("SELECT k, val FROM v").fetchall())
        for key, value in EXACT_VALUES:
            assert type(got[key]) is type(value), key
            if isinstance(value, float):
                assert struct.pack(">d", got[key]) == struct.pack(">d", value), key
            else:
                assert got[key] == value, key
        assert math.copysign(1.0, got["negzero"]) == -1.0
        assert table_digest(origin_db) == table_digest(replica_db)
        # The applier's writes are not in the replica's change log (no echo).
        assert replica_capture.pending_count() == 0
        # ...while the replica's own application writes still are.
        connect(replica_db).execute("UPDATE v SET val = 'local' WHERE k = 'int'")
        assert [c.change.values for c in replica_capture.read_pending()] == [("int", "local")]


def test_primary_key_update_leaves_no_orphan(wal_db):
    origin_db = wal_db("a.db", SCHEMA)
    replica_db = wal_db("b.db", SCHEMA)
    with ChangeCapture(origin_db, 1) as source, BatchApplier(replica_db, 2) as applier:
        source.install()
        conn = connect(origin_db)
        conn.execute("INSERT INTO t VALUES ('old', 1)")
        ship(source, applier, "s", 1)
        conn.execute("UPDATE t SET k = 'new' WHERE k = 'old'")
        ship(source, applier, "s", 2)
    assert rows_of(replica_db) == {"new": 1}


def test_positions_duplicates_and_stream_independence(wal_db):
    db = wal_db(schema=SCHEMA)
    with BatchApplier(db, 2) as applier:
        assert applier.positions() == {}
        first = applier.apply(batch(up("t", "a", 1, BASE + 1, 1)), "s-1", 5)
        assert first.rows_applied == 1 and not first.duplicate
        again = applier.apply(batch(up("t", "a", 99, BASE + 9, 1)), "s-1", 5)
        assert again.duplicate and rows_of(db) == {"a": 1}
        older = applier.apply(batch(up("t", "a", 98, BASE + 8, 1)), "s-1", 4)
        assert older.duplicate
        applier.apply(batch(up("t", "b", 2, BASE + 2, 1)), "s-2", 1)
        assert applier.positions() == {"s-1": 5, "s-2": 1}
    # Positions are in the database, not in memory.
    with BatchApplier(db, 2) as reopened:
        assert reopened.positions() == {"s-1": 5, "s-2": 1}


def test_last_writer_wins_by_version_then_origin(wal_db):
    db = wal_db(schema=SCHEMA)
    with BatchApplier(db, 9) as applier:
        applier.apply(batch(up("t", "a", "v10/o2", BASE + 10, 2)), "s", 1)
        stale = applier.apply(batch(up("t", "a", "v5/o3", BASE + 5, 3)), "s", 2)
        assert stale.rows_stale == 1 and stale.rows_applied == 0
        assert rows_of(db) == {"a": "v10/o2"}
        tie_lower = applier.apply(batch(up("t", "a", "v10/o1", BASE + 10, 1)), "s", 3)
        assert tie_lower.rows_stale == 1 and rows_of(db) == {"a": "v10/o2"}
        tie_higher = applier.apply(batch(up("t", "a", "v10/o3", BASE + 10, 3)), "s", 4)
        assert tie_higher.rows_applied == 1 and rows_of(db) == {"a": "v10/o3"}
        # Within one batch the order of rows does not matter either.
        applier.apply(
            ChangeBatch(origin=4, rows=(up("t", "b", "v30", BASE + 30, 4), up("t", "b", "v20", BASE + 20, 4))), "s", 5
        )
        assert rows_of(db)["b"] == "v30"


def test_delete_is_a_tombstone_that_stale_writes_cannot_undo(wal_db):
    db = wal_db(schema=SCHEMA)
    with BatchApplier(db, 9) as applier:
        applier.apply(batch(up("t", "a", 1, BASE + 1, 1)), "s", 1)
        applier.apply(batch(delete("t", "a", BASE + 3, 2)), "s", 2)
        assert rows_of(db) == {}
        late = applier.apply(batch(up("t", "a", "late", BASE + 2, 1)), "s", 3)
        assert late.rows_stale == 1 and rows_of(db) == {}
        # A delete that arrives before the row it deletes still wins over that older insert.
        applier.apply(batch(delete("t", "b", BASE + 8, 2)), "s", 4)
        applier.apply(batch(up("t", "b", "older", BASE + 7, 1)), "s", 5)
        assert rows_of(db) == {}
        newer = applier.apply(batch(up("t", "a", "reborn", BASE + 4, 3)), "s", 6)
        assert newer.rows_applied == 1 and rows_of(db) == {"a": "reborn"}


def wire(change_batch: ChangeBatch) -> GroupedBatch:
    """The batch as a receiver gets it from the stream: row groups, applied set-based."""
    keyed = ChangeBatch(origin=change_batch.origin, rows=change_batch.rows,
                        primary_keys={row.table: ("k",) for row in change_batch.rows})
    grouped = decode_for_apply(encode_batch(keyed))
    assert isinstance(grouped, GroupedBatch)
    return grouped


def test_row_groups_apply_only_the_rows_that_win(wal_db):
    """The set-based path (GroupedBatch) leaves out its row guard only when every row of a group
    won its key; a stale row, a key a batch carries twice, or a tombstone keeps it."""
    db = wal_db(schema=SCHEMA + "CREATE TABLE audit (v); CREATE TRIGGER t_ins AFTER INSERT ON t "
                "BEGIN INSERT INTO audit VALUES (NEW.v); END; CREATE TRIGGER t_upd AFTER UPDATE ON t "
                "BEGIN INSERT INTO audit VALUES (NEW.v); END;")
    with BatchApplier(db, 9) as applier:
        fresh = applier.apply(wire(batch(up("t", "a", "a10", BASE + 10, 2), up("t", "b", "b10", BASE + 10, 2))), "s", 1)
        assert fresh.rows_applied == 2 and rows_of(db) == {"a": "a10", "b": "b10"}
        # One stale row among fresh ones: only the fresh one lands.
        mixed = applier.apply(wire(batch(up("t", "a", "a5", BASE + 5, 3), up("t", "b", "b11", BASE + 11, 3))), "s", 2)
        assert (mixed.rows_applied, mixed.rows_stale) == (1, 1)
        assert rows_of(db) == {"a": "a10", "b": "b11"}
        # A key twice in one batch, older first: both win their versions in turn, only the newer
        # row is written (the application's trigger sees one write, not two).
        connect(db).execute("DELETE FROM audit")
        applier.apply(wire(batch(up("t", "c", "c20", BASE + 20, 2), up("t", "c", "c21", BASE + 21, 2))), "s", 3)
        assert rows_of(db)["c"] == "c21"
        assert connect(db).execute("SELECT v FROM audit").fetchall() == [("c21",)]
        # A tombstone keeps a late, older insert out.
        applier.apply(wire(batch(delete("t", "a", BASE + 30, 2))), "s", 4)
        late = applier.apply(wire(batch(up("t", "a", "a25", BASE + 25, 1), up("t", "d", "d25", BASE + 25, 1))), "s", 5)
        assert (late.rows_applied, late.rows_stale) == (1, 1)
        assert rows_of(db) == {"b": "b11", "c": "c21", "d": "d25"}


def test_unpublished_local_write_beats_an_older_remote_one(wal_db):
    db = wal_db(schema=SCHEMA)
    with ChangeCapture(db, 2) as capture, BatchApplier(db, 2) as applier:
        capture.install()
        connect(db).execute("INSERT INTO t VALUES ('a', 'local')")  # pending, not published
        local_version = capture.read_pending()[0].change.version
        older = applier.apply(batch(up("t", "a", "remote-older", local_version - 1, 1)), "s", 1)
        assert older.rows_stale == 1 and rows_of(db) == {"a": "local"}
        newer = applier.apply(batch(up("t", "a", "remote-newer", local_version + 1, 1)), "s", 2)
        assert newer.rows_applied == 1 and rows_of(db) == {"a": "remote-newer"}


def test_applied_versions_advance_the_local_clock(wal_db):
    db = wal_db(schema=SCHEMA)
    far_future = int((time.time() + 30) * 1000) << 16  # ahead, but within max_clock_skew_s (60 s)
    with ChangeCapture(db, 2) as capture, BatchApplier(db, 2) as applier:
        capture.install()
        applier.apply(batch(up("t", "a", "remote", far_future, 1)), "s", 1)
        connect(db).execute("UPDATE t SET v = 'local edit after seeing it'")
        assert capture.read_pending()[0].change.version > far_future


def test_upsert_is_a_full_row_image_that_keeps_the_rowid(wal_db):
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY, v, added_later DEFAULT 'd', UNIQUE (v));")
    conn = connect(db)
    conn.execute("INSERT INTO t VALUES ('a', 1, 'mine')")
    rowid_before = conn.execute("SELECT rowid FROM t WHERE k = 'a'").fetchone()[0]
    with BatchApplier(db, 2) as applier:
        applier.apply(batch(up("t", "a", 2, BASE + 1, 1), up("t", "b", 3, BASE + 2, 1)), "s", 1)
    # The writer's schema had no added_later (a rolling ADD COLUMN): the newest row wins as a
    # whole, so that column takes its default, as on the writer once it migrates (issue 10
    # case 6). Still not INSERT OR REPLACE: the rowid stays.
    assert conn.execute("SELECT k, v, added_later, rowid FROM t ORDER BY k").fetchall() == [
        ("a", 2, "d", rowid_before),
        ("b", 3, "d", rowid_before + 1),
    ]


def test_a_row_violating_another_constraint_is_dead_lettered_alone(wal_db):
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY, v CHECK (v <> 'forbidden'));")
    connect(db).execute("INSERT INTO t VALUES ('x', 'kept')")
    with BatchApplier(db, 2) as applier:
        outcome = applier.apply(
            batch(up("t", "a", "fine", BASE + 1, 1), up("t", "b", "forbidden", BASE + 2, 1), up("t", "c", "also fine", BASE + 3, 1)),
            "s",
            1,
        )
        assert (outcome.rows_applied, outcome.rows_rejected) == (2, 1)
        assert rows_of(db) == {"x": "kept", "a": "fine", "c": "also fine"}
        assert applier.dead_letter_count() == 1
        assert applier.positions() == {"s": 1}
    stream, seq, reason, payload = connect(db).execute(
        f'SELECT stream, seq, reason, payload FROM "{DEAD_LETTER_TABLE}"'
    ).fetchone()
    assert (stream, seq) == ("s", 1) and "CHECK" in reason
    assert decode_parked_change(payload).pk == ("b",)


def test_a_unique_collision_is_settled_by_version_not_dead_lettered(wal_db):
    """Newer than every row it collides with: those rows go (tombstoned at its version) and it is
    applied. Older than one of them: it loses, and its key is tombstoned at the winner's version."""
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY, v UNIQUE);")
    connect(db).execute("INSERT INTO t VALUES ('x', 'taken')")  # existed before replication: no version
    with BatchApplier(db, 2) as applier:
        newer = applier.apply(batch(up("t", "b", "taken", BASE + 2, 1)), "s", 1)
        assert (newer.rows_applied, newer.rows_rejected) == (1, 0)
        assert rows_of(db) == {"b": "taken"}
        # An older row claiming the same value loses; so does a later change older than 'b'.
        older = applier.apply(batch(up("t", "y", "taken", BASE + 1, 3)), "s", 2)
        assert (older.rows_applied, older.rows_stale, older.rows_rejected) == (0, 1, 0)
        assert rows_of(db) == {"b": "taken"}
        revived_too_late = applier.apply(batch(up("t", "y", "free", BASE + 1, 3)), "s", 3)
        assert revived_too_late.rows_applied == 0 and rows_of(db) == {"b": "taken"}
        # The displaced 'x' is tombstoned at b's version: only a newer change brings it back.
        applier.apply(batch(up("t", "x", "back", BASE + 2, 0)), "s", 4)
        assert rows_of(db) == {"b": "taken"}
        applier.apply(batch(up("t", "x", "back", BASE + 3, 1)), "s", 5)
        assert rows_of(db) == {"b": "taken", "x": "back"}
        assert applier.dead_letter_count() == 0


def test_dead_letter_records_the_message_and_moves_the_position(wal_db):
    db = wal_db(schema=SCHEMA)
    with BatchApplier(db, 2) as applier:
        applier.dead_letter("s-1", 7, b"\xffgarbage", "undecodable: bad version byte")
        assert applier.dead_letter_count() == 1
        assert applier.positions() == {"s-1": 7}
        later = applier.apply(batch(up("t", "a", 1, BASE + 1, 1)), "s-1", 8)
        assert later.rows_applied == 1
    row = connect(db).execute(f'SELECT stream, seq, reason, payload, received_at FROM "{DEAD_LETTER_TABLE}"').fetchone()
    assert row[:4] == ("s-1", 7, "undecodable: bad version byte", b"\xffgarbage") and row[4] > 0


def test_rows_for_missing_tables_and_columns_are_parked_until_the_schema_catches_up(wal_db):
    db = wal_db(schema=SCHEMA)
    with BatchApplier(db, 2) as applier:
        outcome = applier.apply(
            batch(
                up("t", "a", 1, BASE + 1, 1),
                RowChange("t", "upsert", ("b",), ("k", "v", "extra"), ("b", 2, "x"), BASE + 2, 1),
                up("later", "c", 3, BASE + 3, 1),
            ),
            "s",
            1,
        )
        assert (outcome.rows_applied, outcome.rows_parked) == (1, 2)
        assert applier.positions() == {"s": 1}
        assert applier.parked_count() == 2
        assert applier.retry_parked() == 0  # nothing changed yet
        conn = connect(db)
        conn.execute("ALTER TABLE t ADD COLUMN extra")
        assert applier.retry_parked() == 1
        assert conn.execute("SELECT * FROM t ORDER BY k").fetchall() == [("a", 1, None), ("b", 2, "x")]
        conn.execute("CREATE TABLE later (k TEXT PRIMARY KEY, v)")
        # A newer version arrived meanwhile: the parked older row must not overwrite it.
        applier.apply(batch(up("later", "c", "newer", BASE + 10, 3)), "s", 2)
        assert applier.retry_parked() == 1
        assert applier.parked_count() == 0
        assert rows_of(db, "later") == {"c": "newer"}


def test_unselected_tables_are_ignored_not_parked(wal_db):
    db = wal_db(schema=SCHEMA + "CREATE TABLE secret (k TEXT PRIMARY KEY, v);")
    with BatchApplier(db, 2, TableSelection(exclude=("secret", "absent"))) as applier:
        outcome = applier.apply(
            batch(up("t", "a", 1, BASE + 1, 1), up("secret", "s", 2, BASE + 2, 1), up("absent", "x", 3, BASE + 3, 1)),
            "s",
            1,
        )
        assert (outcome.rows_applied, outcome.rows_ignored, outcome.rows_parked) == (1, 2, 0)
    assert rows_of(db, "secret") == {}


@pytest.mark.parametrize("form", ["rows", "wire"])
def test_own_origin_batches_are_skipped_but_advance_the_position(wal_db, form):
    shape = wire if form == "wire" else (lambda b: b)
    db = wal_db(schema=SCHEMA)
    with ChangeCapture(db, 2) as capture, BatchApplier(db, 2) as applier:
        capture.install()
        conn = connect(db)
        conn.execute("INSERT INTO t VALUES ('a', 'mine')")
        pending = capture.read_pending()
        capture.mark_published([p.log_id for p in pending])
        conn.execute("UPDATE t SET v = 'edited since'")
        outcome = applier.apply(shape(ChangeBatch(origin=2, rows=tuple(p.change for p in pending))), "s", 1)
        assert outcome.own_origin and outcome.rows_applied == 0 and outcome.rows_stale == 0
        assert applier.positions() == {"s": 1}
        assert rows_of(db) == {"a": "edited since"}


@pytest.mark.parametrize("form", ["rows", "wire"])
def test_own_rows_missing_after_a_restore_are_applied_from_the_stream(wal_db, tmp_path, form):
    """Also as the stream delivers it (row groups): what the consumer decodes for apply."""
    shape = wire if form == "wire" else (lambda b: b)
    db = wal_db(schema=SCHEMA)
    backup = tmp_path / "backup.db"
    with ChangeCapture(db, 2) as capture, BatchApplier(db, 2) as applier:
        capture.install()
        connect(db).execute("VACUUM INTO ?", (str(backup),))  # the "snapshot"
        connect(db).execute("INSERT INTO t VALUES ('after snapshot', 1)")
        pending = capture.read_pending()
        own_batch = shape(ChangeBatch(origin=2, rows=tuple(p.change for p in pending)))
        capture.mark_published([p.log_id for p in pending])
        applier.apply(own_batch, "s", 1)  # normal operation: skipped, the row is here
    # Restore the snapshot into the live file with the backup API, as the snapshot part does.
    src = sqlite3.connect(backup)
    dst = sqlite3.connect(db)
    src.backup(dst)
    src.close()
    dst.close()
    assert rows_of(db) == {}
    reset_own_origin_horizon(db)
    with BatchApplier(db, 2) as applier:
        outcome = applier.apply(own_batch, "s", 1)
        assert outcome.own_origin and outcome.rows_applied == 1
    assert rows_of(db) == {"after snapshot": 1}


def test_busy_database_raises_a_transient_error_and_changes_nothing(wal_db):
    db = wal_db(schema=SCHEMA)
    holder = connect(db)
    with BatchApplier(db, 2, busy_timeout_ms=50) as applier:
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(DatabaseBusyError) as raised:
                applier.apply(batch(up("t", "a", 1, BASE + 1, 1)), "s", 1)
            assert isinstance(raised.value, TransientError)
        finally:
            holder.execute("ROLLBACK")
        assert applier.positions() == {} and rows_of(db) == {}
        assert applier.apply(batch(up("t", "a", 1, BASE + 1, 1)), "s", 1).rows_applied == 1


def test_apply_many_uses_one_transaction_and_composite_keys(wal_db):
    db = wal_db(schema="CREATE TABLE p (a, b, v, PRIMARY KEY (a, b)) WITHOUT ROWID;")
    rows = [
        RowChange("p", "upsert", (1, "x"), ("a", "b", "v"), (1, "x", "first"), BASE + 1, 1),
        RowChange("p", "upsert", (1, "y"), ("b", "v", "a"), ("y", "column order differs", 1), BASE + 2, 3),
    ]
    with BatchApplier(db, 2) as applier:
        outcomes = applier.apply_many(
            [
                (ChangeBatch(origin=1, rows=(rows[0],)), "s-1", 1),
                (ChangeBatch(origin=3, rows=(rows[1],)), "s-2", 1),
                (ChangeBatch(origin=1, rows=(RowChange("p", "delete", (1, "x"), ("a", "b"), (1, "x"), BASE + 3, 1),)), "s-1", 2),
            ]
        )
        assert [o.rows_applied for o in outcomes] == [1, 1, 1]
        assert applier.positions() == {"s-1": 2, "s-2": 1}
    assert connect(db).execute("SELECT * FROM p").fetchall() == [(1, "y", "column order differs")]


def test_malformed_rows_are_dead_lettered_not_fatal(wal_db):
    db = wal_db(schema=SCHEMA)
    with BatchApplier(db, 2) as applier:
        outcome = applier.apply(
            batch(
                RowChange("t", "upsert", ("a",), ("k", "v"), ("a",), BASE + 1, 1),  # too few values
                RowChange("t", "upsert", ("b",), ("k", "v"), ("b", {"not": "sqlite"}), BASE + 2, 1),
                up("t", "c", 3, BASE + 3, 1),
            ),
            "s",
            1,
        )
        assert (outcome.rows_rejected, outcome.rows_applied) == (2, 1)
        assert applier.dead_letter_count() == 2
    assert rows_of(db) == {"c": 3}


def test_key_change_under_a_nocase_key_replicates(wal_db):
    schema = "CREATE TABLE t (k TEXT PRIMARY KEY COLLATE NOCASE, v);"
    origin_db = wal_db("a.db", schema)
    replica_db = wal_db("b.db", schema)
    with ChangeCapture(origin_db, 1) as source, BatchApplier(replica_db, 2) as applier:
        source.install()
        conn = connect(origin_db)
        conn.execute("INSERT INTO t VALUES ('abc', 1)")
        conn.execute("UPDATE t SET k = 'ABC'")  # same key for SQLite, new spelling
        ship(source, applier, "s", 1)  # insert, delete('abc'), upsert('ABC') in one batch
    assert rows_of(replica_db) == {"ABC": 1}


def test_new_table_catch_up_does_not_recapture_rows_from_other_nodes(wal_db):
    db = wal_db(schema=SCHEMA)
    with ChangeCapture(db, 2) as capture, BatchApplier(db, 2) as applier:
        capture.install()
        applier.apply(batch(up("fresh", "remote", 1, BASE + 1, 1)), "s", 1)  # parked: no table yet
        conn = connect(db)
        conn.execute("CREATE TABLE fresh (k TEXT PRIMARY KEY, v)")
        conn.execute("INSERT INTO fresh VALUES ('local', 2)")  # before capture knows the table
        assert applier.retry_parked() == 1
        capture.install()
        assert [(c.change.table, c.change.pk) for c in capture.read_pending()] == [("fresh", ("local",))]
    assert rows_of(db, "fresh") == {"remote": 1, "local": 2}


def test_case_only_key_change_of_an_existing_row_reaches_the_replica(wal_db):
    """Issue 10 case 7: 'alice' -> 'Alice' under COLLATE NOCASE on a row the replica already holds.

    The rename arrives as delete('alice') + upsert('Alice') in one batch; both name the same
    key for SQLite, so the upsert's ON CONFLICT used to keep the replica's old spelling.
    """
    schema = "CREATE TABLE t (k TEXT PRIMARY KEY COLLATE NOCASE, v);"
    origin_db = wal_db("a.db", schema)
    replica_db = wal_db("b.db", schema)
    with ChangeCapture(origin_db, 1) as source, BatchApplier(replica_db, 2) as applier:
        source.install()
        conn = connect(origin_db)
        conn.execute("INSERT INTO t VALUES ('alice', 1)")
        ship(source, applier, "s", 1)
        assert rows_of(replica_db) == {"alice": 1}
        conn.execute("UPDATE t SET k = 'Alice'")
        ship(source, applier, "s", 2)
        conn.execute("UPDATE t SET k = 'ALICE', v = 2")  # a key and a value change together
        ship(source, applier, "s", 3)
    assert rows_of(origin_db) == {"ALICE": 2}
    assert rows_of(replica_db) == {"ALICE": 2}


def _version_at(seconds_from_now: float) -> int:
    return int((time.time() + seconds_from_now) * 1000) << 16


def _clock(db) -> int:
    return connect(db).execute("SELECT hlc FROM _marmot_clock").fetchone()[0]


def test_versions_from_beyond_the_clock_skew_are_held_then_applied_and_absurd_ones_dead_lettered(wal_db):
    """Issue 10 case 10, on one database: nothing received can pin the clock or break local writes."""
    db = wal_db(schema=SCHEMA)
    with ChangeCapture(db, 2) as capture, BatchApplier(db, 2, max_clock_skew_s=1) as applier:
        capture.install()
        outcome = applier.apply(batch(
            up("t", "soon", "held a few seconds", _version_at(2.5), 3),
            up("t", "max", "2**63-1", 2**63 - 1, 4),
            up("t", "far", "1 << 62", 1 << 62, 4),
            up("t", "now", "applied", _version_at(0), 3),
        ), "s", 1)
        assert (outcome.rows_applied, outcome.rows_held, outcome.rows_rejected) == (1, 1, 2)
        assert rows_of(db) == {"now": "applied"}
        assert _clock(db) < _version_at(1)  # not dragged ahead by any of them
        report = applier.waiting_report()
        assert list(report.held_by_origin) == [3] and report.held_by_origin[3][0] == 1
        assert report.skew_dead_letters_by_origin[4][0] == 2
        assert applier.dead_letter_count() == 2
        conn = connect(db)
        conn.execute("INSERT INTO t VALUES ('local', 'write still works')")  # hlc + 1 stays in range
        assert applier.retry_held() == 0  # not yet due
        deadline = time.monotonic() + 60
        while applier.retry_held() == 0:
            assert time.monotonic() < deadline, "held row never applied"
            time.sleep(0.2)
        assert rows_of(db)["soon"] == "held a few seconds"
        assert applier.held_count() == 0 and applier.waiting_report().held_by_origin == {}


def test_parked_rows_are_retried_only_when_their_table_changes_in_chunks(wal_db):
    """Issue 10 case 11: no schema change, no work; an unrelated table's change, no work."""
    db = wal_db(schema=SCHEMA)
    with BatchApplier(db, 2) as applier:
        rows = [up("later", f"k{i}", i, BASE + i, 1) for i in range(1, 1201)]
        applier.apply(batch(*rows), "s", 1)
        assert applier.parked_count() == 1200
        assert applier.retry_parked(chunk_rows=500) == 0  # first look after start: table still missing
        looked = applier.waiting_report().retried_rows
        assert looked == 1200
        assert applier.retry_parked(chunk_rows=500) == 0
        connect(db).execute("CREATE TABLE unrelated (k TEXT PRIMARY KEY)")
        assert applier.retry_parked(chunk_rows=500) == 0
        assert applier.waiting_report().retried_rows == looked  # nothing decoded again
        connect(db).execute("CREATE TABLE later (k TEXT PRIMARY KEY, v)")
        chunks_before = applier.waiting_report().retry_chunks
        assert applier.retry_parked(chunk_rows=500) == 1200
        assert applier.waiting_report().retry_chunks - chunks_before == 3  # 500 + 500 + 200
        assert applier.parked_count() == 0
    assert len(rows_of(db, "later")) == 1200


def test_every_row_the_applier_dead_letters_itself_is_counted_once(wal_db):
    """Rows set aside one at a time (SQLite refused, absurd clock, park overflow) feed
    marmot_dead_letters_total through waiting_report().dead_lettered_rows; a whole message the
    consumer dead-letters is counted by the consumer, not here."""
    db = wal_db(schema=SCHEMA + "CREATE TABLE c (k TEXT PRIMARY KEY, v INTEGER CHECK (v > 0));")
    with BatchApplier(db, 2, max_parked_rows=1) as applier:
        outcome = applier.apply(batch(up("c", "bad", -1, BASE + 1, 1), up("c", "good", 1, BASE + 2, 1),
                                      up("t", "future", 1, 1 << 62, 1),
                                      up("later", "p1", 1, BASE + 3, 1), up("later", "p2", 2, BASE + 4, 1)), "s", 1)
        assert (outcome.rows_applied, outcome.rows_parked, outcome.rows_rejected) == (1, 1, 3)
        applier.dead_letter("s", 2, b"garbage", "undecodable message")
        assert applier.waiting_report().dead_lettered_rows == 3
        assert applier.dead_letter_count() == 4


def test_parked_rows_are_bounded_and_the_overflow_is_dead_lettered_and_counted(wal_db):
    db = wal_db(schema=SCHEMA)
    with BatchApplier(db, 2, max_parked_rows=10) as applier:
        applier.apply(batch(*[up("later", f"k{i}", i, BASE + i, 1) for i in range(1, 8)]), "s", 1)
        outcome = applier.apply(batch(*[up("later", f"j{i}", i, BASE + 100 + i, 1) for i in range(1, 8)]), "s", 2)
        assert (outcome.rows_parked, outcome.rows_rejected) == (3, 4)
        assert applier.parked_count() == 10
        assert applier.waiting_report().park_overflow == 4
        reasons = [r for (r,) in connect(db).execute(f"SELECT reason FROM {DEAD_LETTER_TABLE}")]
        assert len(reasons) == 4 and all("max_parked_rows 10" in r for r in reasons)
