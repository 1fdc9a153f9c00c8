"""Which snapshots may be saved and restored (issue 10, cases 13 and 4). Real 3-server JetStream
cluster, real database files.

* Case 13: a node behind the newest snapshot on some stream does not save (its copy would become
  the newest and push the better one out of `keep`); a restore takes only a snapshot that reaches
  `first_seq - 1` on every stream, not only on the stream with the gap (else the restore itself
  opens a gap on another stream).
* Case 4: a snapshot saved by a node that excludes a table holds that node's *local* rows of it;
  a node that replicates the table does not restore it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest

from marmot_appliance.snapshots import (
    NoSnapshotError,
    SnapshotBehind,
    open_store,
    restore_if_needed,
    restore_snapshot,
    save_snapshot,
)
from marmot_appliance.snapshots.store import retry_no_responders
from marmot_appliance.spec.model import TableSelection
from tests.harness import add_stream
from tests.snapshot_support import SCHEMA, connect, fill, make_cluster, positions_of, user_digests

S1, S2 = "marmot-changes-1", "marmot-changes-2"


async def manifest_of(js, cluster):
    store = await open_store(js, cluster, create=False)
    return (await store.read_manifest())[0]


async def test_a_node_behind_the_newest_snapshot_does_not_save(nats_cluster, wal_db):
    ahead = wal_db("n1.db", SCHEMA)
    lagging = wal_db("n2.db", SCHEMA)
    cluster = make_cluster(nats_cluster.urls, {"n1": ahead, "n2": lagging}, keep=1)
    fill(ahead, 0, 50, positions={S1: 10, S2: 10})
    fill(lagging, 0, 30, positions={S1: 12, S2: 5})  # ahead on one stream, behind on the other
    nc, js = await connect(nats_cluster.urls)
    try:
        good = await save_snapshot(js, cluster, cluster.node("n1"), ahead)
        for force in (False, True):
            with pytest.raises(SnapshotBehind, match=f"{S2} at 5 < 10"):
                await save_snapshot(js, cluster, cluster.node("n2"), lagging, force=force)
        manifest = await manifest_of(js, cluster)
        assert [s.name for s in manifest.snapshots] == [good.name]  # keep=1 did not drop it

        fill(lagging, 0, 30, positions={S2: 10})  # caught up: now at or past the newest everywhere
        better = await save_snapshot(js, cluster, cluster.node("n2"), lagging)
        assert better.positions == {S1: 12, S2: 10}
    finally:
        await nc.close()


async def test_restore_takes_only_a_snapshot_reaching_every_streams_first_entry(nats_cluster, wal_db):
    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    cluster = make_cluster(nats_cluster.urls, {"n1": source, "n2": target})
    nc, js = await connect(nats_cluster.urls)
    try:
        for shard, stream in ((1, S1), (2, S2)):
            await add_stream(js, name=stream, subjects=[f"marmot-change-log-{shard}"])
            for i in range(30):
                await retry_no_responders(lambda: js.publish(f"marmot-change-log-{shard}", b"x%d" % i))
        await js.purge_stream(S1, seq=21)  # S1 starts at 21
        await js.purge_stream(S2, seq=26)  # S2 starts at 26
        fill(source, 0, 40, positions={S1: 30, S2: 10})
        await save_snapshot(js, cluster, cluster.node("n1"), source)
        # The target has a gap on S1 only; the snapshot closes it but is behind S2's first entry.
        fill(target, 1000, 10, positions={S1: 5, S2: 30})
        before = user_digests(target)
        with pytest.raises(NoSnapshotError, match=f"stream {S2} no longer holds entries up to 25"):
            await restore_if_needed(js, cluster, cluster.node("n2"), target)
        assert positions_of(target) == {S1: 5, S2: 30}  # untouched: no new gap on S2
        assert user_digests(target) == before

        fill(source, 0, 40, positions={S2: 25})
        await save_snapshot(js, cluster, cluster.node("n1"), source)
        assert await restore_if_needed(js, cluster, cluster.node("n2"), target)
        assert positions_of(target) == {S1: 30, S2: 25}
    finally:
        await nc.close()


def _with_tables(cluster, name: str, selection: TableSelection):
    nodes = tuple(replace(n, tables=selection) if n.name == name else n for n in cluster.nodes)
    return replace(cluster, nodes=nodes)


def _sessions(db) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return sorted(conn.execute("SELECT token, user FROM sessions").fetchall())
    finally:
        conn.close()


async def test_a_snapshot_from_a_node_excluding_a_table_is_not_restored_where_it_is_replicated(nats_cluster, wal_db):
    saver = wal_db("n1.db", SCHEMA)
    full = wal_db("n2.db", SCHEMA)
    alike = wal_db("n3.db", SCHEMA)
    cluster = make_cluster(nats_cluster.urls, {"n1": saver, "n2": full, "n3": alike})
    excluding = TableSelection(exclude=("sessions",))
    cluster = _with_tables(_with_tables(cluster, "n1", excluding), "n3", excluding)
    fill(saver, 0, 40, positions={S1: 4})
    for db, token in ((saver, "n1-local"), (full, "cluster-row"), (alike, "n3-local")):
        conn = sqlite3.connect(db)
        conn.execute("INSERT INTO sessions VALUES (?, 'someone')", (token,))
        conn.commit()
        conn.close()
    nc, js = await connect(nats_cluster.urls)
    try:
        info = await save_snapshot(js, cluster, cluster.node("n1"), saver)
        recorded = (await manifest_of(js, cluster)).newest
        assert recorded.name == info.name
        assert recorded.selection == {"include": [], "exclude": ["sessions"]}
        assert recorded.local_tables == ("sessions",)
        assert set(recorded.tables) == {"items"} and len(recorded.tables["items"]) == 16

        before = user_digests(full)
        with pytest.raises(NoSnapshotError, match="does not replicate sessions"):
            await restore_snapshot(js, cluster, cluster.node("n2"), full)
        assert user_digests(full) == before and _sessions(full) == [("cluster-row", "someone")]

        # A node with the same exclusion may restore it; its own local rows stay.
        await restore_snapshot(js, cluster, cluster.node("n3"), alike)
        assert user_digests(alike)["items"] == user_digests(saver)["items"]
        assert _sessions(alike) == [("n3-local", "someone")]
    finally:
        await nc.close()
