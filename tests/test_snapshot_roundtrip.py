"""Save, list and restore snapshots through a real 3-server JetStream cluster, real files."""

from __future__ import annotations

import sqlite3

import pytest

from marmot_appliance.snapshots import (
    NoSnapshotError,
    SnapshotUpToDate,
    open_store,
    restore_snapshot,
    save_snapshot,
)
from tests.snapshot_support import SCHEMA, connect, fill, make_cluster, positions_of, user_digests


async def test_save_list_restore_round_trip(nats_cluster, wal_db):
    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    fill(source, 0, 3000, positions={"marmot-changes-1": 17, "marmot-changes-2": 9})
    cluster = make_cluster(nats_cluster.urls, {"n1": source, "n2": target})
    nc, js = await connect(nats_cluster.urls)
    try:
        info = await save_snapshot(js, cluster, cluster.node("n1"), source)
        assert info.positions == {"marmot-changes-1": 17, "marmot-changes-2": 9}
        assert info.generation == 1 and info.node == "n1" and info.size > 0

        store = await open_store(js, cluster, create=False)
        manifest, _rev = await store.read_manifest()
        assert [s.name for s in manifest.snapshots] == [info.name]
        assert await store.object_names() == [info.name]

        restored = await restore_snapshot(js, cluster, cluster.node("n2"), target)
        assert restored.name == info.name
    finally:
        await nc.close()
    assert user_digests(target)["items"] == user_digests(source)["items"]
    # The node's positions are the snapshot's: it replays from there.
    assert positions_of(target) == {"marmot-changes-1": 17, "marmot-changes-2": 9}
    conn = sqlite3.connect(target)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # exact storage classes survived the trip
        assert conn.execute("SELECT typeof(id), typeof(qty), typeof(price), typeof(blob) FROM items LIMIT 1").fetchone() == (
            "text", "integer", "real", "blob"
        )
    finally:
        conn.close()


async def test_keep_limits_snapshots_and_up_to_date_save_is_skipped(nats_cluster, wal_db):
    db = wal_db("n1.db", SCHEMA)
    cluster = make_cluster(nats_cluster.urls, {"n1": db}, keep=2)
    nc, js = await connect(nats_cluster.urls)
    try:
        names = []
        for round_ in range(3):
            fill(db, round_ * 100, 100, positions={"marmot-changes-1": 10 * (round_ + 1)})
            names.append((await save_snapshot(js, cluster, cluster.node("n1"), db)).name)
        with pytest.raises(SnapshotUpToDate):
            await save_snapshot(js, cluster, cluster.node("n1"), db)
        store = await open_store(js, cluster, create=False)
        manifest, _rev = await store.read_manifest()
        assert [s.name for s in manifest.snapshots] == [names[2], names[1]]
        assert [s.generation for s in manifest.snapshots] == [3, 2]
        assert sorted(await store.object_names()) == sorted(names[1:])
        forced = await save_snapshot(js, cluster, cluster.node("n1"), db, force=True)
        assert forced.generation == 4
    finally:
        await nc.close()


async def test_restore_without_any_snapshot_fails_clearly(nats_cluster, wal_db):
    db = wal_db("n1.db", SCHEMA)
    cluster = make_cluster(nats_cluster.urls, {"n1": db})
    nc, js = await connect(nats_cluster.urls)
    try:
        with pytest.raises(NoSnapshotError):
            await restore_snapshot(js, cluster, cluster.node("n1"), db)
    finally:
        await nc.close()


async def test_tables_a_node_does_not_replicate_keep_their_local_rows(nats_cluster, wal_db):
    from dataclasses import replace

    from marmot_appliance.spec.model import TableSelection

    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    fill(source, 0, 100, positions={"marmot-changes-1": 8})
    conn = sqlite3.connect(source)
    conn.execute("INSERT INTO sessions VALUES ('n1-token', 'alice')")
    conn.commit()
    conn.close()
    conn = sqlite3.connect(target)
    conn.execute("INSERT INTO sessions VALUES ('n2-token', 'bob')")
    conn.commit()
    conn.close()
    cluster = make_cluster(nats_cluster.urls, {"n1": source, "n2": target})
    n2 = replace(cluster.node("n2"), tables=TableSelection(exclude=("sessions",)))
    nc, js = await connect(nats_cluster.urls)
    try:
        await save_snapshot(js, cluster, cluster.node("n1"), source)
        await restore_snapshot(js, cluster, n2, target)
    finally:
        await nc.close()
    conn = sqlite3.connect(target)
    try:
        assert conn.execute("SELECT * FROM sessions").fetchall() == [("n2-token", "bob")]
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (100,)
    finally:
        conn.close()


async def test_orphan_objects_of_an_interrupted_save_are_collected_by_the_next_save(nats_cluster, wal_db):
    """The object store keeps only the kept snapshots (issue 14): an object the manifest does
    not name (a saver that died between upload and manifest) goes with the next save."""
    db = wal_db("n1.db", SCHEMA)
    cluster = make_cluster(nats_cluster.urls, {"n1": db}, keep=2)
    nc, js = await connect(nats_cluster.urls)
    try:
        fill(db, 0, 100, positions={"marmot-changes-1": 10})
        first = await save_snapshot(js, cluster, cluster.node("n1"), db)
        store = await open_store(js, cluster, create=False)
        objects = await js.object_store(store.bucket)
        await objects.put("snapshot-orphan-of-a-crashed-save", b"x" * 4096)
        assert sorted(await store.object_names()) == sorted([first.name, "snapshot-orphan-of-a-crashed-save"])
        fill(db, 100, 100, positions={"marmot-changes-1": 20})
        second = await save_snapshot(js, cluster, cluster.node("n1"), db)
        assert sorted(await store.object_names()) == sorted([first.name, second.name])
    finally:
        await nc.close()
