"""Conflicts, poison messages, schema drift, NATS outages: the node keeps its promises."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import nats

from marmot_appliance.replication.types import DEAD_LETTER_TABLE
from tests.replication_cluster import InProcessNode, execute, http_get, table_rows, wait_converged, wait_until

SCHEMA = "CREATE TABLE doc (id TEXT PRIMARY KEY, body TEXT, rev INTEGER)"


async def test_concurrent_writes_converge_to_the_newest_version_not_the_last_arrival(nats_cluster, wal_db):
    """Every node writes the same rows while offline; node 3 writes last (newest clock).

    The nodes then come online in reverse order (3, 2, 1), so node 1's stale versions reach the
    streams last. Ordering by arrival (Marmot v1) would let node 1 win; versions must not.
    """
    dbs = [wal_db(f"c{i}.db", SCHEMA) for i in (1, 2, 3)]
    nodes = [InProcessNode(i, db, nats_cluster.url) for i, db in zip((1, 2, 3), dbs)]
    for node in nodes:  # install capture, then go offline
        await node.start()
        await node.stop()
    for i, db in enumerate(dbs, 1):
        execute(db, "INSERT INTO doc VALUES (?, ?, ?)", [(f"d{k}", f"written by {i}", i) for k in range(30)], many=True)
        execute(db, "DELETE FROM doc WHERE id = 'd0'") if i == 2 else None
        time.sleep(0.01)  # the hybrid clock is millisecond based: make node 3 strictly newest
    execute(dbs[2], "UPDATE doc SET body = 'final' WHERE id = 'd1'")
    try:
        for node in reversed(nodes):
            await node.start()
            await asyncio.sleep(0.5)
        await wait_converged(dbs)
        rows = {r[0]: r for r in table_rows(dbs[0], "doc")}
        assert rows["d1"] == ("d1", "final", 3)
        assert all(rows[f"d{k}"] == (f"d{k}", "written by 3", 3) for k in range(2, 30))
        # Node 2's delete of d0 is older than node 3's insert of d0: the insert wins everywhere.
        assert rows["d0"] == ("d0", "written by 3", 3)
    finally:
        for node in nodes:
            await node.stop()


async def test_garbage_message_is_dead_lettered_and_replication_continues(nats_cluster, wal_db):
    dbs = [wal_db(f"g{i}.db", SCHEMA) for i in (1, 2)]
    nodes = [InProcessNode(i, db, nats_cluster.url, shards=1) for i, db in zip((1, 2), dbs)]
    for node in nodes:
        await node.start()
    try:
        nc = await nats.connect(nats_cluster.urls, connect_timeout=10)
        try:
            js = nc.jetstream(timeout=10)
            await js.publish("marmot-change-log-1.9", b"\x01\x00this is not CBOR \xff\xfe")
            await js.publish("marmot-change-log-1.9", b"")
            await js.publish("marmot-change-log-1.9", b"\x07\x00future format")
        finally:
            await nc.close()
        execute(dbs[0], "INSERT INTO doc VALUES ('after', 'still flows', 1)")
        await wait_until(lambda: table_rows(dbs[1], "doc") == [("after", "still flows", 1)], what="later batch")

        def dead_letters(db):
            conn = sqlite3.connect(db)
            try:
                return conn.execute(f'SELECT count(*) FROM "{DEAD_LETTER_TABLE}"').fetchone()[0]
            finally:
                conn.close()

        await wait_until(lambda: all(dead_letters(db) == 3 for db in dbs), what="3 dead letters on each node")
        assert all(n.runtime.metrics.get("dead_letters") == 3 for n in nodes)
        health = await asyncio.to_thread(_health, nodes[1].http_url)
        assert health[1]["dead_letters"] == 3 and health[0] == 200
    finally:
        for node in nodes:
            await node.stop()


async def test_new_table_and_column_replicate_without_restart(nats_cluster, wal_db):
    dbs = [wal_db(f"s{i}.db", SCHEMA) for i in (1, 2, 3)]
    nodes = [InProcessNode(i, db, nats_cluster.url) for i, db in zip((1, 2, 3), dbs)]
    for node in nodes:
        await node.start()
    try:
        # The schema change reaches node 1 first and writes follow at once: nodes 2 and 3 park
        # the rows they cannot apply yet, and apply them when their schema catches up.
        execute(dbs[0], "CREATE TABLE tag (name TEXT PRIMARY KEY, color TEXT)")
        execute(dbs[0], "ALTER TABLE doc ADD COLUMN author TEXT")
        await asyncio.sleep(1.5)  # let node 1 notice its schema change (checked every 0.5 s)
        execute(dbs[0], "INSERT INTO tag VALUES ('red', '#f00')")
        execute(dbs[0], "INSERT INTO doc VALUES ('x', 'body', 1, 'ann')")
        await asyncio.sleep(1.0)
        for db in dbs[1:]:
            execute(db, "CREATE TABLE tag (name TEXT PRIMARY KEY, color TEXT)")
            execute(db, "ALTER TABLE doc ADD COLUMN author TEXT")
        await wait_converged(dbs)
        assert table_rows(dbs[2], "tag") == [("red", "#f00")]
        assert table_rows(dbs[2], "doc") == [("x", "body", 1, "ann")]
        # And the new table is captured on the other nodes too, without a restart.
        execute(dbs[2], "INSERT INTO tag VALUES ('blue', '#00f')")
        await wait_converged(dbs)
        assert len(table_rows(dbs[0], "tag")) == 2
    finally:
        for node in nodes:
            await node.stop()


def _health(url: str) -> tuple[int, dict]:
    code, text = http_get(url + "/health")
    return code, json.loads(text)


async def test_health_follows_the_nats_connection(nats_cluster, wal_db):
    db = wal_db("h.db", SCHEMA)
    peer_db = wal_db("h2.db", SCHEMA)
    node = InProcessNode(1, db, nats_cluster.url)
    peer = InProcessNode(2, peer_db, nats_cluster.url)
    await node.start()
    await peer.start()
    try:
        code, body = await asyncio.to_thread(_health, node.http_url)
        assert code == 200 and body["status"] == "ok" and body["nats"]["connected"] is True
        assert body["capture"]["installed"] is True and body["database"]["ok"] is True
        nats_cluster.stop()
        await wait_until(lambda: _health(node.http_url)[0] == 503, what="/health to turn unhealthy")
        code, body = await asyncio.to_thread(_health, node.http_url)
        assert body["status"] == "unhealthy" and body["nats"]["connected"] is False
        # Writes made during the outage are kept and published after it.
        execute(db, "INSERT INTO doc VALUES ('during-outage', 'kept', 1)")
        for index in range(len(nats_cluster.processes)):
            nats_cluster.processes[index].start()
        for cfg, proc in zip(nats_cluster.configs, nats_cluster.processes):
            proc.wait_listening("127.0.0.1", cfg.client_port)
        await wait_until(lambda: _health(node.http_url)[0] == 200, what="/health to recover")
        await wait_until(lambda: table_rows(peer_db, "doc") == [("during-outage", "kept", 1)],
                         what="the row written during the outage to replicate")
    finally:
        await node.stop()
        await peer.stop()


async def test_nodes_with_snapshots_enabled_replicate_and_save_snapshot_flag_works(nats_cluster, wal_db):
    import subprocess
    import sys

    dbs = [wal_db(f"snap{i}.db", SCHEMA) for i in (1, 2)]
    nodes = [InProcessNode(i, db, nats_cluster.url, extra={"enable_snapshot": True}) for i, db in zip((1, 2), dbs)]
    for node in nodes:
        await node.start()
    try:
        execute(dbs[0], "INSERT INTO doc VALUES ('s', 'snap', 1)")
        await wait_converged(dbs)
    finally:
        for node in nodes:
            assert await node.stop() == 0
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "marmot_appliance", "node", "-save-snapshot", "-db-path", str(dbs[1]), "-node-id", "2",
         "-nats-url", nats_cluster.url, "-shards", "2", "-log-replicas", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "snapshot saved" in result.stderr, result.stderr


async def test_seq_map_path_keeps_a_cbor_copy_of_applied_positions(nats_cluster, wal_db, tmp_path):
    from marmot_appliance.node.seq_map import read_seq_map

    seq_map = tmp_path / "seq-map.cbor"
    dbs = [wal_db(f"m{i}.db", SCHEMA) for i in (1, 2)]
    writer = InProcessNode(1, dbs[0], nats_cluster.url)
    reader = InProcessNode(2, dbs[1], nats_cluster.url, extra={"seq_map_path": str(seq_map)})
    await writer.start()
    await reader.start()
    try:
        execute(dbs[0], "INSERT INTO doc VALUES (?, ?, ?)", [(f"k{i}", "v", i) for i in range(20)], many=True)
        await wait_converged(dbs)
    finally:
        await writer.stop()
        await reader.stop()
    conn = sqlite3.connect(dbs[1])
    positions = dict(conn.execute('SELECT stream, seq FROM "_marmot_positions"').fetchall())
    conn.close()
    assert positions and read_seq_map(seq_map) == positions


async def test_a_dead_runtime_part_stops_the_node_with_a_failure_exit(nats_cluster, wal_db, monkeypatch):
    """A bug that ends a part (here the publisher) must not leave a half-dead node reporting ok."""
    from marmot_appliance.replication.publisher import Publisher

    async def broken_run(self, stop):
        raise RuntimeError("injected publisher bug")

    monkeypatch.setattr(Publisher, "run", broken_run)
    node = InProcessNode(1, wal_db("dead.db", SCHEMA), nats_cluster.url)
    await node.start()
    code = await asyncio.wait_for(node.task, 60)
    node.task = None
    assert code == 1
    assert node.runtime.status.failed_parts == {"publish": "RuntimeError: injected publisher bug"}
    assert node.runtime.status.healthy is False
    assert node.runtime.status.as_health()["status"] == "unhealthy"
