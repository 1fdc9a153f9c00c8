"""A restored snapshot is untrusted input: its schema must match ours before the backup runs.

Real 3-server JetStream cluster, real SQLite files. A snapshot carrying a trigger this node does
not have (here one that wipes `items` on every insert) used to become this node's schema by the
restore; now it is refused with the differences named and the live database stays as it was.
"""

from __future__ import annotations

import sqlite3

import pytest

from marmot_appliance.snapshots import RestoreRefusedError, restore_snapshot, save_snapshot
from marmot_appliance.snapshots.dbrestore import check_untrusted_copy
from marmot_appliance.spec.model import TableSelection
from tests.snapshot_support import SCHEMA, connect, fill, make_cluster, user_digests

EVIL_TRIGGER = "CREATE TRIGGER wipe AFTER INSERT ON items BEGIN DELETE FROM items; END"


def schema_of(db) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE name NOT LIKE '\\_marmot\\_%' ESCAPE '\\'")}
    finally:
        conn.close()


async def test_snapshot_with_a_foreign_trigger_is_refused(nats_cluster, wal_db):
    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    fill(target, 0, 5)
    before = user_digests(target)
    cluster = make_cluster(nats_cluster.urls, {"n1": source, "n2": target})
    fill(source, 0, 50, positions={"marmot-changes-1": 4})
    conn = sqlite3.connect(source)
    conn.execute(EVIL_TRIGGER)
    conn.close()
    nc, js = await connect(nats_cluster.urls)
    try:
        await save_snapshot(js, cluster, cluster.node("n1"), source)
        with pytest.raises(RestoreRefusedError, match="schema differs.*trigger wipe: only in the snapshot"):
            await restore_snapshot(js, cluster, cluster.node("n2"), target)
    finally:
        await nc.close()
    assert "wipe" not in schema_of(target)
    assert user_digests(target) == before


def test_same_schema_and_fresh_databases_pass_the_check(tmp_path, wal_db):
    """The check refuses differences only: an identical schema passes (capture triggers and
    other `_marmot_*` objects aside), and so does a database without tables yet."""
    copy = wal_db("copy.db", SCHEMA)
    live = wal_db("live.db", SCHEMA)
    conn = sqlite3.connect(live)
    conn.execute("CREATE TABLE _marmot_private (x)")
    conn.close()
    check_untrusted_copy(copy, live, TableSelection())
    check_untrusted_copy(copy, wal_db("empty.db", ""), TableSelection())
    # A table this node does not replicate may differ: its live contents are kept anyway.
    conn = sqlite3.connect(copy)
    conn.execute("CREATE INDEX sessions_user ON sessions (user)")
    conn.close()
    check_untrusted_copy(copy, live, TableSelection(exclude=("sessions",)))
    with pytest.raises(RestoreRefusedError, match="index sessions_user: only in the snapshot"):
        check_untrusted_copy(copy, live, TableSelection())
