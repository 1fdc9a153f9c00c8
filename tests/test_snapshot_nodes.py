"""Snapshots with real node runtimes: a node that fell behind a truncated log, and a brand-new
node, restore, replay and converge. Real 3-server JetStream cluster, real database files."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass, replace

import nats

from marmot_appliance.node.config import NodeConfig
from marmot_appliance.snapshots import open_store, save_snapshot
from marmot_appliance.spec.model import SnapshotSettings
from tests.harness import settled
from tests.replication_cluster import InProcessNode, digest, execute, wait_converged, wait_until

SCHEMA = "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, n INTEGER);"
MAX_LOG_ENTRIES = 30
STREAM = "marmot-changes-1"


@dataclass
class SnapshotNode(InProcessNode):
    """An in-process node with small logs and the given snapshot settings."""

    snapshots: SnapshotSettings = SnapshotSettings(enabled=True, every_entries=None)

    def config(self) -> NodeConfig:
        config = super().config()
        return replace(config, cluster=replace(config.cluster, snapshots=self.snapshots))


def node(i: int, db, url: str, **snapshots) -> SnapshotNode:
    settings = SnapshotSettings(**{"enabled": True, "every_entries": None, **snapshots})
    return SnapshotNode(i, db, url, shards=1, extra={"max_log_entries": MAX_LOG_ENTRIES, "enable_snapshot": True},
                        snapshots=settings)


async def write_many_commits(db, prefix: str, count: int) -> None:
    """Separate commits with a pause between, so they travel as many stream entries."""
    for k in range(count):
        execute(db, "INSERT INTO notes VALUES (?, ?, ?)", (f"{prefix}-{k}", f"body {k}", k))
        await asyncio.sleep(0.01)


async def stream_first_seq(js) -> int:
    return (await settled(lambda: js.stream_info(STREAM))).state.first_seq


async def push_log_past(js, db, prefix: str, position: int) -> None:
    """Write until the stream no longer holds the entry after `position` (bounded)."""
    for round_ in range(20):
        if await stream_first_seq(js) > position + 1:
            return
        await write_many_commits(db, f"{prefix}{round_}", MAX_LOG_ENTRIES)
    raise AssertionError("the stream was never truncated past the stopped node's position")


def applied_position(db) -> int:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT seq FROM _marmot_positions WHERE stream = ?", (STREAM,)).fetchone()
        return row[0] if row else 0
    finally:
        conn.close()


async def test_node_stopped_past_truncation_restores_replays_and_converges(nats_cluster, wal_db, caplog):
    dbs = [wal_db(f"n{i}.db", SCHEMA) for i in (1, 2, 3)]
    nodes = [node(i, db, nats_cluster.url) for i, db in zip((1, 2, 3), dbs)]
    nc = await nats.connect(servers=nats_cluster.urls)
    js = nc.jetstream(timeout=30)
    try:
        for n in nodes:
            await n.start()
        await write_many_commits(dbs[0], "before", 10)
        await wait_converged(dbs)
        await nodes[2].stop()
        stopped_at = applied_position(dbs[2])
        # A change made on the stopped node: captured, not published yet. It must survive.
        execute(dbs[2], "INSERT INTO notes VALUES ('offline-write', 'made while n3 was down', -1)")

        await write_many_commits(dbs[1], "while-down", 20)
        await push_log_past(js, dbs[0], "more", stopped_at)
        await wait_converged(dbs[:2])
        cluster = nodes[0].runtime.config.cluster
        info = await save_snapshot(js, cluster, nodes[0].runtime.node, dbs[0])
        assert info.positions[STREAM] >= await stream_first_seq(js) - 1

        with caplog.at_level(logging.WARNING, logger="marmot_appliance.snapshots"):
            await nodes[2].start()
        assert any("restoring a snapshot" in r.getMessage() for r in caplog.records)
        final = await wait_converged(dbs)
        assert all(digest(db) == final for db in dbs)
        conn = sqlite3.connect(dbs[0])
        assert conn.execute("SELECT n FROM notes WHERE id = 'offline-write'").fetchone() == (-1,)
        conn.close()
        # New writes on the restored node still replicate (it publishes as itself).
        execute(dbs[2], "INSERT INTO notes VALUES ('after-restore', 'from n3', 3)")
        await wait_converged(dbs)
    finally:
        for n in nodes:
            await n.stop()
        await nc.close()


async def test_new_empty_node_joins_from_automatic_snapshot_and_converges(nats_cluster, wal_db):
    dbs = [wal_db(f"n{i}.db", SCHEMA) for i in (1, 2)]
    fresh = wal_db("n3.db")  # no tables at all: everything comes from the snapshot
    running = [node(i, db, nats_cluster.url, every_entries=20) for i, db in zip((1, 2), dbs)]
    nc = await nats.connect(servers=nats_cluster.urls)
    js = nc.jetstream(timeout=30)
    newcomer = node(3, fresh, nats_cluster.url)
    try:
        for n in running:
            await n.start()
        await write_many_commits(dbs[0], "a", 20)
        await push_log_past(js, dbs[1], "b", 0)
        await wait_converged(dbs)
        cluster = running[0].runtime.config.cluster
        first_seq = await stream_first_seq(js)

        async def automatic_snapshot_covers_log_start() -> bool:
            try:
                store = await open_store(js, cluster, create=False)
            except Exception:
                return False
            newest = (await store.read_manifest())[0].newest
            return newest is not None and newest.positions.get(STREAM, 0) >= first_seq - 1

        await wait_until(automatic_snapshot_covers_log_start, 120, 0.5, "the scheduler to save a snapshot")
        await newcomer.start()
        await wait_converged([*dbs, fresh])
        execute(fresh, "INSERT INTO notes VALUES ('hello-from-n3', 'x', 1)")
        await wait_converged([*dbs, fresh])
    finally:
        await newcomer.stop()
        for n in running:
            await n.stop()
        await nc.close()
