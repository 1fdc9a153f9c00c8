"""Rows written before a node's first start completes reach the cluster (issue 10, case 15).

Real nats-servers, real `marmot-appliance node` processes, real SQLite files.
"""

from __future__ import annotations

import nats

from marmot_appliance.node.config import config_from_flags
from marmot_appliance.snapshots import save_snapshot
from tests.replication_cluster import (
    InProcessNode,
    SubprocessNode,
    execute,
    table_rows,
    wait_converged,
    wait_until,
)

SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY, v)"


async def test_writes_while_nats_is_unreachable_at_first_start_are_published(nats_cluster, wal_db, tmp_path):
    """Before: capture was installed only after JetStream answered, so rows committed while the
    node waited were never captured and never left the node (health ok afterwards)."""
    late = nats_cluster.processes[2]
    late.stop()  # the only server node 2 knows is not up yet
    db1, db2 = wal_db("n1.db", SCHEMA), wal_db("n2.db", SCHEMA)
    urls = nats_cluster.urls
    node1 = await InProcessNode(1, db1, ",".join(urls[:2]), shards=2, replicas=1).start()
    node2 = SubprocessNode(2, db2, urls[2], tmp_path / "n2.log", shards=2, replicas=1).start()
    try:
        await wait_until(lambda: node2.health() is not None, 60, 0.1, "node 2 to serve /health")
        health = node2.health()
        assert not health["nats"]["connected"] and health["status"] == "unhealthy"
        await wait_until(lambda: node2.health()["capture"]["installed"], 30, 0.1,
                         "capture on node 2 while NATS is unreachable")
        execute(db2, "INSERT INTO kv VALUES (?, ?)", [(f"early-{i}", i) for i in range(20)], many=True)
        execute(db2, "CREATE TABLE later (id TEXT PRIMARY KEY, note)")  # an app creating its schema
        execute(db2, "INSERT INTO later VALUES ('x', 'made while waiting')")
        execute(db1, "CREATE TABLE later (id TEXT PRIMARY KEY, note)")
        late.start()
        late.wait_listening("127.0.0.1", nats_cluster.configs[2].client_port)
        await node2.wait_healthy(90)
        await wait_converged([db1, db2])
        assert len(table_rows(db1, "kv")) == 20
        assert table_rows(db1, "later") == [("x", "made while waiting")]
    finally:
        node2.terminate()
        await node1.stop()
    assert "Traceback" not in (tmp_path / "n2.log").read_text()


async def test_boot_restore_does_not_replace_rows_the_cluster_does_not_know(nats_server, wal_db, tmp_path):
    """Before: a new node whose database already held rows restored the newest snapshot at its
    first start and those rows vanished (kept only in a .before-restore side file)."""
    db1, db2 = wal_db("n1.db", SCHEMA), wal_db("n2.db", SCHEMA)
    snapshot_flags = ["-enable-snapshot=true"]
    node1 = SubprocessNode(1, db1, nats_server.url, tmp_path / "n1.log", shards=1, replicas=1, extra=snapshot_flags).start()
    try:
        await node1.wait_healthy()
        execute(db1, "INSERT INTO kv VALUES (?, ?)", [(f"cluster-{i}", i) for i in range(10)], many=True)
        await wait_until(lambda: node1.health()["pending_rows"] == 0 and node1.health()["applied"], 30, 0.2,
                         "node 1 to publish")
        config = config_from_flags(str(db1), 1, nats_server.url, shards=1, log_replicas=1)
        nc = await nats.connect(nats_server.url)
        try:
            await save_snapshot(nc.jetstream(), config.cluster, config.node, db1, force=True)
        finally:
            await nc.close()
        # The application wrote into node 2's file before node 2 ever ran.
        execute(db2, "INSERT INTO kv VALUES (?, ?)", [(f"local-{i}", i) for i in range(5)], many=True)
        node2 = SubprocessNode(2, db2, nats_server.url, tmp_path / "n2.log", shards=1, replicas=1,
                         extra=snapshot_flags).start()
        try:
            await node2.wait_healthy(90)
            await wait_converged([db1, db2])
            keys = {row[0] for row in table_rows(db1, "kv")}
            assert {f"local-{i}" for i in range(5)} <= keys, keys
            assert len(keys) == 15
        finally:
            node2.terminate()
    finally:
        node1.terminate()
    for name in ("n1.log", "n2.log"):
        assert "Traceback" not in (tmp_path / name).read_text()
