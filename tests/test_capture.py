"""Capture: pure-SQL triggers on real SQLite files, read back as RowChanges."""

from __future__ import annotations

import math
import os
import shutil
import sqlite3
import struct
import subprocess
import time

import pytest

from marmot_appliance.errors import DatabaseStateError
from marmot_appliance.replication.capture import ChangeCapture, NodeIdChangeError, remove_bookkeeping, require_wal
from marmot_appliance.replication.digest import table_digest
from marmot_appliance.replication.sqlite_util import DatabaseBusyError
from marmot_appliance.replication.types import BOOKKEEPING_PREFIX
from marmot_appliance.spec.model import TableSelection
from tests.conftest import skip_or_fail


def connect(path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def changes(capture: ChangeCapture, limit: int = 100_000):
    return [p.change for p in capture.read_pending(limit)]


def bookkeeping_objects(path) -> list[str]:
    conn = connect(path)
    try:
        names = [row[0] for row in conn.execute("SELECT name FROM sqlite_schema")]
    finally:
        conn.close()
    return [name for name in names if name.startswith(BOOKKEEPING_PREFIX)]


def test_install_selects_ordinary_tables_and_reports_key_problems(wal_db):
    db = wal_db(
        schema="""
        CREATE TABLE items (sku TEXT PRIMARY KEY, name TEXT);
        CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT);
        CREATE TABLE loose (a, b);
        CREATE TABLE pairs (a, b, v, PRIMARY KEY (a, b)) WITHOUT ROWID;
        CREATE VIRTUAL TABLE docs USING fts5(body);
        CREATE TABLE "_marmotish" (k TEXT PRIMARY KEY);
        CREATE TABLE "xmarmotx_y" (k TEXT PRIMARY KEY);
        """
    )
    with ChangeCapture(db, node_id=1) as capture:
        report = capture.install()
    # fts5 creates shadow tables (docs_data, docs_idx, ...): neither they nor docs are captured.
    assert report.tables == ("_marmotish", "books", "items", "pairs", "xmarmotx_y")
    assert "loose" in report.skipped and "no primary key" in report.skipped["loose"]
    assert any("'loose'" in w and "no primary key" in w for w in report.warnings)
    assert any("'books'" in w and "INTEGER PRIMARY KEY" in w for w in report.warnings)
    assert not any("items" in w for w in report.warnings)
    assert report.changed


def test_include_and_exclude_are_honoured(wal_db):
    db = wal_db(schema="CREATE TABLE a (k TEXT PRIMARY KEY); CREATE TABLE b (k TEXT PRIMARY KEY); CREATE TABLE c (k TEXT PRIMARY KEY);")
    with ChangeCapture(db, 1, TableSelection(include=("a", "b"), exclude=("b",))) as capture:
        report = capture.install()
        assert report.tables == ("a",)
        conn = connect(db)
        conn.executescript("INSERT INTO a VALUES ('1'); INSERT INTO b VALUES ('1'); INSERT INTO c VALUES ('1');")
        assert [c.table for c in changes(capture)] == ["a"]


def test_install_is_idempotent(wal_db):
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY, v);")
    with ChangeCapture(db, 1) as capture:
        assert capture.install().changed
        conn = connect(db)
        before = conn.execute("PRAGMA schema_version").fetchone()[0]
        second = capture.install()
        assert not second.changed
        assert conn.execute("PRAGMA schema_version").fetchone()[0] == before
        assert not capture.schema_changed()
    with ChangeCapture(db, 1) as other_instance:
        assert not other_instance.install().changed


EXACT_VALUES = [
    ("int", 0),
    ("bigint", 2**63 - 1),
    ("negbig", -(2**63)),
    ("real", 0.1),
    ("negzero", -0.0),  # kept by SQLite in an untyped column (a REAL column stores it as 0)
    ("tiny", 5e-324),
    ("huge", 1.7976931348623157e308),
    ("text", "naïve ✓ \x00 inside"),
    ("blob", b"\x00\xff\x00binary\x01"),
    ("null", None),
    ("numeric_text", "007"),
    ("bigtext", "x" * (1 << 20)),
    ("bigblob", os.urandom(1 << 20)),
]


def same_value(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    return a == b


def test_values_of_every_storage_class_are_captured_exactly(wal_db):
    db = wal_db(schema="CREATE TABLE v (k TEXT PRIMARY KEY, val);")
    with ChangeCapture(db, 7) as capture:
        capture.install()
        conn = connect(db)
        for key, value in EXACT_VALUES:
            conn.execute("INSERT INTO v VALUES (?, ?)", (key, value))
        captured = {c.pk[0]: c for c in changes(capture)}
    assert set(captured) == {key for key, _ in EXACT_VALUES}
    for key, value in EXACT_VALUES:
        change = captured[key]
        assert change.op == "upsert" and change.origin == 7
        assert change.columns == ("k", "val")
        assert same_value(change.values[1], value), key
    assert math.copysign(1.0, captured["negzero"].values[1]) == -1.0


def test_insert_update_delete_and_primary_key_change(wal_db):
    db = wal_db(schema='CREATE TABLE "odd ""name""" ("key col" TEXT PRIMARY KEY, "select" INTEGER, "v""q");')
    with ChangeCapture(db, 3) as capture:
        capture.install()
        conn = connect(db)
        conn.execute('INSERT INTO "odd ""name""" VALUES (?, ?, ?)', ("a", 1, "x"))
        conn.execute('UPDATE "odd ""name""" SET "select" = 2')
        conn.execute('UPDATE "odd ""name""" SET "key col" = ? WHERE "key col" = ?', ("b", "a"))
        conn.execute('DELETE FROM "odd ""name"""')
        got = [(c.op, c.pk, c.values) for c in changes(capture)]
    assert got == [
        ("upsert", ("a",), ("a", 1, "x")),
        ("upsert", ("a",), ("a", 2, "x")),
        ("delete", ("a",), ("a",)),  # a key change is delete(old) + upsert(new)
        ("upsert", ("b",), ("b", 2, "x")),
        ("delete", ("b",), ("b",)),
    ]


def test_versions_are_hybrid_clock_values_in_commit_order_across_tables(wal_db):
    db = wal_db(schema="CREATE TABLE a (k TEXT PRIMARY KEY); CREATE TABLE b (k TEXT PRIMARY KEY);")
    with ChangeCapture(db, 1) as capture:
        capture.install()
        conn = connect(db)
        before_ms = int(time.time() * 1000)
        order = []
        for i in range(30):
            table = "ab"[i % 3 == 0]
            conn.execute(f"INSERT INTO {table} VALUES (?)", (str(i),))
            order.append((table, str(i)))
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO a VALUES (?)", [(f"t{i}",) for i in range(50)])
        conn.execute("COMMIT")
        order += [("a", f"t{i}") for i in range(50)]
        after_ms = int(time.time() * 1000)
        pending = capture.read_pending(1000)
    assert [(p.change.table, p.change.pk[0]) for p in pending] == order
    versions = [p.change.version for p in pending]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert all(p.log_id == p.change.version for p in pending)
    # version = (wall clock ms << 16) + counter: the millisecond part lies within the test's run
    # (allowing the clock's own coarse resolution of a few ms).
    assert before_ms - 50 <= (versions[0] >> 16) <= (versions[-1] >> 16) <= after_ms + 50


def test_read_pending_limit_returns_the_oldest_across_tables(wal_db):
    db = wal_db(schema="CREATE TABLE a (k TEXT PRIMARY KEY); CREATE TABLE b (k TEXT PRIMARY KEY);")
    with ChangeCapture(db, 1) as capture:
        capture.install()
        conn = connect(db)
        for i in range(10):
            conn.execute("INSERT INTO b VALUES (?)", (str(i),))
            conn.execute("INSERT INTO a VALUES (?)", (str(i),))
        first = capture.read_pending(5)
        assert [(p.change.table, p.change.pk[0]) for p in first] == [("b", "0"), ("a", "0"), ("b", "1"), ("a", "1"), ("b", "2")]
        assert capture.pending_count() == 20
        assert capture.mark_published([p.log_id for p in first]) == 5
        assert capture.pending_count() == 15
        rest = capture.read_pending(100)
        assert len(rest) == 15 and rest[0].change.pk == ("2",) and rest[0].change.table == "a"
        assert capture.mark_published([p.log_id for p in rest]) == 15
        assert capture.read_pending(100) == []


def test_mark_published_folds_versions_into_bookkeeping(wal_db):
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY, v);")
    with ChangeCapture(db, 4) as capture:
        capture.install()
        conn = connect(db)
        conn.execute("INSERT INTO t VALUES ('a', 1)")
        conn.execute("DELETE FROM t")
        pending = capture.read_pending()
        capture.mark_published([p.log_id for p in pending])
        rows = conn.execute(f'SELECT k0, version, origin, deleted FROM "{BOOKKEEPING_PREFIX}ver_t"').fetchall()
    assert rows == [("a", pending[-1].change.version, 4, 1)]  # a versioned tombstone


def test_trusted_schema_off_client_writes_are_captured(wal_db):
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY, v);")
    with ChangeCapture(db, 1) as capture:
        capture.install()
        client = connect(db)
        client.execute("PRAGMA trusted_schema = OFF")
        client.execute("INSERT INTO t VALUES ('a', 1)")
        client.execute("UPDATE t SET v = 2")
        client.execute("DELETE FROM t")
        assert [c.op for c in changes(capture)] == ["upsert", "upsert", "delete"]


def test_sqlite3_command_line_shell_writes_are_captured(wal_db):
    shell = shutil.which("sqlite3")
    if shell is None:
        skip_or_fail("the sqlite3 command-line shell is not installed (apt-get install sqlite3)")
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY, v);")
    with ChangeCapture(db, 1) as capture:
        capture.install()
        script = "PRAGMA trusted_schema=OFF; INSERT INTO t VALUES ('cli', x'0001'); UPDATE t SET k = 'cli2';"
        subprocess.run([shell, str(db), script], check=True, capture_output=True, timeout=60)
        got = [(c.op, c.pk, c.values) for c in changes(capture)]
    assert got == [
        ("upsert", ("cli",), ("cli", b"\x00\x01")),
        ("delete", ("cli",), ("cli",)),
        ("upsert", ("cli2",), ("cli2", b"\x00\x01")),
    ]


def test_schema_drift_new_column_and_new_table(wal_db):
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY, v);")
    with ChangeCapture(db, 1) as capture:
        first = capture.install()
        conn = connect(db)
        conn.execute("INSERT INTO t VALUES ('before', 1)")
        assert not capture.schema_changed()
        conn.execute("ALTER TABLE t ADD COLUMN extra")
        conn.execute("CREATE TABLE fresh (id TEXT PRIMARY KEY, x)")
        conn.execute("INSERT INTO fresh VALUES ('early', 0)")  # before any trigger exists on it
        assert capture.schema_changed()
        # Until the re-install the old triggers capture the columns they know.
        conn.execute("INSERT INTO t VALUES ('between', 2, 'new column value')")
        report = capture.install()
        assert not capture.schema_changed()
        assert report.tables == ("fresh", "t")
        assert capture.fingerprints()["t"] != first and "fresh" in capture.primary_keys()
        conn.execute("INSERT INTO t VALUES ('after', 3, 'kept')")
        conn.execute("INSERT INTO fresh VALUES ('f', 9)")
        got = [(c.table, c.columns, c.values) for c in changes(capture)]
    assert got == [
        ("t", ("k", "v"), ("before", 1)),
        ("t", ("k", "v"), ("between", 2)),
        # The re-install catches up: the new table's existing rows, and the rows written
        # after the schema was last seen unchanged, now with every column.
        ("fresh", ("id", "x"), ("early", 0)),
        ("t", ("k", "v", "extra"), ("between", 2, "new column value")),
        ("t", ("k", "v", "extra"), ("after", 3, "kept")),
        ("fresh", ("id", "x"), ("f", 9)),
    ]


def test_schema_change_while_capture_was_not_running_is_caught_up(wal_db):
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY, v);")
    with ChangeCapture(db, 1) as capture:
        capture.install()
        connect(db).execute("INSERT INTO t VALUES ('old', 1)")
        capture.mark_published([p.log_id for p in capture.read_pending()])
    conn = connect(db)
    conn.execute("ALTER TABLE t ADD COLUMN extra")
    conn.execute("INSERT INTO t VALUES ('offline', 2, 'x')")
    with ChangeCapture(db, 1) as capture:  # a restarted runtime
        capture.install()
        got = [(c.columns, c.values) for c in changes(capture)]
    assert got == [(("k", "v"), ("offline", 2)), (("k", "v", "extra"), ("offline", 2, "x"))]


def test_rows_pending_across_a_column_rename_keep_their_layout(wal_db):
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY, old_name);")
    with ChangeCapture(db, 1) as capture:
        capture.install()
        conn = connect(db)
        conn.execute("INSERT INTO t VALUES ('a', 1)")
        conn.execute("ALTER TABLE t RENAME COLUMN old_name TO new_name")
        capture.install()
        conn.execute("INSERT INTO t VALUES ('b', 2)")
        pending = capture.read_pending()
    assert [(p.change.columns, p.change.values) for p in pending] == [
        (("k", "old_name"), ("a", 1)),
        (("k", "new_name"), ("a", 1)),  # re-captured under the new name by the re-install
        (("k", "new_name"), ("b", 2)),
    ]
    assert pending[0].fingerprint != pending[1].fingerprint == pending[2].fingerprint


def test_generated_columns_are_not_captured(wal_db):
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER, doubled INTEGER GENERATED ALWAYS AS (v * 2) STORED);")
    with ChangeCapture(db, 1) as capture:
        capture.install()
        connect(db).execute("INSERT INTO t (k, v) VALUES ('a', 21)")
        assert [(c.columns, c.values) for c in changes(capture)] == [(("k", "v"), ("a", 21))]


def test_excluding_a_table_later_drops_its_triggers_and_drained_log(wal_db):
    db = wal_db(schema="CREATE TABLE a (k TEXT PRIMARY KEY); CREATE TABLE b (k TEXT PRIMARY KEY);")
    with ChangeCapture(db, 1) as capture:
        capture.install()
        conn = connect(db)
        conn.execute("INSERT INTO b VALUES ('1')")
    with ChangeCapture(db, 1, TableSelection(exclude=("b",))) as capture:
        capture.install()
        conn.execute("INSERT INTO b VALUES ('2')")
        # The row captured before the exclusion is still published; then the log goes away.
        pending = capture.read_pending()
        assert [(p.change.table, p.change.pk) for p in pending] == [("b", ("1",))]
        assert f"{BOOKKEEPING_PREFIX}log_b" in bookkeeping_objects(db)
        capture.mark_published([p.log_id for p in pending])
        assert capture.purge_published() == 1
        assert f"{BOOKKEEPING_PREFIX}log_b" not in bookkeeping_objects(db)
        conn.execute("INSERT INTO b VALUES ('3')")  # application writes keep working
        assert capture.read_pending() == []


def test_database_from_another_node_is_refused_unless_allowed_and_keeps_pending_rows(wal_db):
    """Issue 10, case 17: another node id on a database is refused; when the operator allows it,
    the pending rows are published under the new id, never discarded."""
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY);")
    with ChangeCapture(db, 1) as capture:
        capture.install()
        connect(db).execute("INSERT INTO t VALUES ('from node 1')")
    with ChangeCapture(db, 2) as capture:
        with pytest.raises(NodeIdChangeError, match="belongs to node id 1"):
            capture.install()
    with ChangeCapture(db, 2, allow_node_id_change=True) as capture:
        report = capture.install()
        assert any("node id 1" in w for w in report.warnings)
        connect(db).execute("INSERT INTO t VALUES ('from node 2')")
        assert [(c.pk, c.origin) for c in changes(capture)] == [(("from node 1",), 2), (("from node 2",), 2)]


def test_remove_bookkeeping_leaves_user_data_identical(wal_db):
    db = wal_db(
        schema="CREATE TABLE t (k TEXT PRIMARY KEY, v); CREATE TABLE loose (a); CREATE TABLE \"_marmot\" (k TEXT PRIMARY KEY);"
    )
    conn = connect(db)
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(str(i), os.urandom(8)) for i in range(100)])
    conn.execute("INSERT INTO loose VALUES (1)")
    conn.execute("INSERT INTO \"_marmot\" VALUES ('user table, not ours')")
    with ChangeCapture(db, 1) as capture:
        capture.install()
        conn.execute("UPDATE t SET v = 'changed' WHERE k = '5'")
    before = table_digest(db)
    assert bookkeeping_objects(db)
    dropped = remove_bookkeeping(db)
    assert dropped and all(name.startswith(BOOKKEEPING_PREFIX) for name in dropped)
    assert bookkeeping_objects(db) == []
    assert table_digest(db) == before
    assert set(before) == {"t", "loose", "_marmot"}
    conn.execute("INSERT INTO t VALUES ('new', 1)")  # no trigger left behind
    assert remove_bookkeeping(db) == []  # safe to run twice


def test_require_wal(tmp_path, wal_db):
    require_wal(wal_db())
    rollback_journal = tmp_path / "rollback.db"
    sqlite3.connect(rollback_journal).execute("CREATE TABLE t (k)").connection.close()
    with pytest.raises(DatabaseStateError, match="journal_mode=delete.*WAL"):
        require_wal(rollback_journal)
    missing = tmp_path / "missing.db"
    with pytest.raises(DatabaseStateError, match="does not exist"):
        require_wal(missing)
    assert not missing.exists()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatabaseStateError, match="cannot open"):
        require_wal(garbage)


def test_install_waits_for_then_reports_a_locked_database(wal_db):
    db = wal_db(schema="CREATE TABLE t (k TEXT PRIMARY KEY);")
    holder = connect(db)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with ChangeCapture(db, 1, busy_timeout_ms=50) as capture:
            with pytest.raises(DatabaseBusyError):
                capture.install()
            holder.execute("COMMIT")
            assert capture.install().tables == ("t",)
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")


def test_incremental_blob_writes_are_not_captured_and_the_documented_update_is(wal_db):
    """docs/capture.md, limits: `blobopen` writes fire no trigger (nothing is logged), and the
    documented remedy, `UPDATE t SET data = data` on that row, logs the row with the new bytes."""
    db = wal_db(schema="CREATE TABLE files (k TEXT PRIMARY KEY, data BLOB)")
    with ChangeCapture(db, node_id=1) as capture:
        capture.install()
        conn = connect(db)
        conn.execute("INSERT INTO files VALUES ('a', zeroblob(4))")
        capture.mark_published([p.log_id for p in capture.read_pending()])
        assert changes(capture) == []

        with conn.blobopen("files", "data", 1) as blob:  # rowid 1 is 'a'
            blob.write(b"\x01\x02\x03\x04")
        assert conn.execute("SELECT data FROM files WHERE k = 'a'").fetchone()[0] == b"\x01\x02\x03\x04"
        assert changes(capture) == [], "incremental BLOB I/O is documented as not captured"

        conn.execute("UPDATE files SET data = data WHERE k = 'a'")
        captured = changes(capture)
        assert len(captured) == 1
        assert captured[0].values[captured[0].columns.index("data")] == b"\x01\x02\x03\x04"
        conn.close()
