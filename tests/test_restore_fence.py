"""The position fence: an apply that began before a snapshot restore never writes into the restored file.

Real SQLite files and the real restore path (prepare_copy_for_node + the online backup API). The
sequence is the one issue 10 (case 1) found on live nodes with shards > 1: a shard consumer's
apply waits on the write lock the backup holds, the backup commits the restored file (older
positions), then the apply commits its newer position into it and the entries in between are
never replayed.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from marmot_appliance.replication.applier import BatchApplier, DatabaseReplacedError
from marmot_appliance.replication.types import ChangeBatch, RowChange
from marmot_appliance.snapshots.dbcopy import consistent_copy
from marmot_appliance.snapshots.dbrestore import backup_into_live, prepare_copy_for_node
from marmot_appliance.spec.model import TableSelection

SCHEMA = "CREATE TABLE t (k TEXT PRIMARY KEY, v);"
STREAMS = ["s-1", "s-2"]
BASE = 1 << 50


def row(key: str, version: int, origin: int = 9) -> RowChange:
    return RowChange("t", "upsert", (key,), ("k", "v"), (key, key.upper()), BASE + version, origin)


def one(key: str, version: int) -> ChangeBatch:
    return ChangeBatch(origin=9, rows=(row(key, version),))


def positions(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT stream, seq FROM _marmot_positions").fetchall())
    finally:
        conn.close()


def keys(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {k for (k,) in conn.execute("SELECT k FROM t")}
    finally:
        conn.close()


def restore_copy(snapshot: Path, live: Path, node_id: int = 3) -> None:
    """What a restore does to the live file: adjust a copy, back it up into the live database."""
    prepare_copy_for_node(snapshot, live, node_id, STREAMS, TableSelection(), install_capture=False)
    backup_into_live(snapshot, live, lambda: 0)


def test_apply_begun_before_a_restore_cannot_move_a_position_in_the_restored_file(wal_db, tmp_path):
    live = wal_db("live.db", SCHEMA)
    applier = BatchApplier(live, 3)
    try:
        applier.apply(one("a", 1), "s-1", 1)
        applier.apply(one("b", 2), "s-2", 1)
        snapshot = tmp_path / "snapshot.db"
        consistent_copy(live, snapshot)  # reflects s-1: 1, s-2: 1
        applier.apply(one("c", 3), "s-2", 2)

        restore_copy(snapshot, live)
        assert positions(live) == {"s-1": 1, "s-2": 1}

        # The other shard's consumer was already past the restored position: its next apply
        # must not land in the restored file (entries s-2:2 would never be replayed).
        with pytest.raises(DatabaseReplacedError):
            applier.apply(one("d", 4), "s-2", 3)
        with pytest.raises(DatabaseReplacedError):
            applier.dead_letter("s-1", 7, b"x", "test")
        assert positions(live) == {"s-1": 1, "s-2": 1}
        assert keys(live) == {"a", "b"}

        # Once the runtime adopted the file, the consumers replay from the restored positions.
        assert applier.adopt_database() == {"s-1": 1, "s-2": 1}
        applier.apply(one("c", 3), "s-2", 2)
        applier.apply(one("d", 4), "s-2", 3)
        assert positions(live) == {"s-1": 1, "s-2": 3}
        assert keys(live) == {"a", "b", "c", "d"}
    finally:
        applier.close()


def test_every_restore_gives_the_file_a_new_epoch(wal_db, tmp_path):
    """Restoring the same snapshot twice still fences an applier that adopted the first restore."""
    live = wal_db("live.db", SCHEMA)
    applier = BatchApplier(live, 3)
    try:
        applier.apply(one("a", 1), "s-1", 1)
        snapshot = tmp_path / "snapshot.db"
        consistent_copy(live, snapshot)
        second = tmp_path / "second.db"
        second.write_bytes(snapshot.read_bytes())
        restore_copy(snapshot, live)
        applier.adopt_database()
        applier.apply(one("b", 2), "s-1", 2)
        restore_copy(second, live)
        with pytest.raises(DatabaseReplacedError):
            applier.apply(one("c", 3), "s-1", 3)
        assert positions(live) == {"s-1": 1, "s-2": 0}
    finally:
        applier.close()
