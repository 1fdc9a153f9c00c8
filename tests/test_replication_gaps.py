"""A gap in a stream is never skipped (issue 10, case 2; docs/replication.md, "Gaps").

Retention drops entries a node has not applied while no snapshot covers them. The node must
hold that stream before the gap (its position never moves past it), stay up with /health 503
and a `gaps` entry, count it in a metric, and recover by itself once any node whose positions
cover the gap saves a snapshot (on request). Real 3-server nats cluster, real
`marmot-appliance node` processes, real SQLite files.
"""

from __future__ import annotations

import asyncio
import os
import signal

import nats

from marmot_appliance.appliance.health import NodeHealth
from marmot_appliance.appliance.status import NodeStatus, ProcessStatus, render_status_text
from marmot_appliance.node.config import config_from_flags
from tests.replication_cluster import (
    SubprocessNode,
    digest,
    execute,
    log_rows,
    positions,
    wait_converged,
    wait_until,
)

SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY, v)"
MAX_LOG_ENTRIES = 20
SHARDS = 2


def flags(snapshots: bool) -> list[str]:
    """A node with a short log (retention drops entries soon) and its snapshot switch."""
    return ["-max-log-entries", str(MAX_LOG_ENTRIES), f"-enable-snapshot={'true' if snapshots else 'false'}"]


async def wait_for_gaps(node: SubprocessNode, what: str) -> dict:
    def gapped():
        if not node.alive():
            raise AssertionError(f"node {node.node_id} exited ({what}): {node.log_path.read_text()[-3000:]}")
        health = node.health()
        return health if health and health.get("gaps") else None

    return await wait_until(gapped, 60, 0.2, f"/health of node {node.node_id} to report a gap ({what})")


async def test_a_gap_is_held_reported_and_closed_by_a_requested_snapshot(nats_cluster, wal_db, tmp_path):
    """Run time and start-up: before, the consumer applied past the gap at run time (health ok,
    rows missing for good) and the node exited 1 at every start."""
    db1, db2 = wal_db("n1.db", SCHEMA), wal_db("n2.db", SCHEMA)
    urls = nats_cluster.urls
    n1 = SubprocessNode(1, db1, ",".join(urls[:2]), tmp_path / "n1.log", shards=SHARDS, extra=flags(False)).start()
    n2 = SubprocessNode(2, db2, ",".join(urls), tmp_path / "n2.log", shards=SHARDS, extra=flags(True)).start()
    try:
        await n1.wait_healthy()
        await n2.wait_healthy()
        execute(db1, "INSERT INTO kv VALUES ('before', 0)")
        await wait_converged([db1, db2])

        # -- run time: n2 is frozen and loses its consumers while n1 writes far more than the
        # streams keep; nothing was pushed to it before, so after it wakes up the entries are gone.
        os.kill(n2.process.pid, signal.SIGSTOP)
        try:
            held = positions(db2)
            nc = await nats.connect(servers=urls)
            try:
                js = nc.jetstream()
                for shard in range(1, SHARDS + 1):
                    for info in await js.consumers_info(f"marmot-changes-{shard}"):
                        await js.delete_consumer(f"marmot-changes-{shard}", info.name)
            finally:
                await nc.close()
            for i in range(8 * MAX_LOG_ENTRIES):
                execute(db1, "INSERT INTO kv VALUES (?, ?)", (f"k{i}", i))
                if i % 10 == 0:
                    await asyncio.sleep(0.05)  # separate publish rounds: many messages per shard
            await wait_until(lambda: log_rows(db1, "kv") == 0, 60, 0.2, "n1 to publish everything")
        finally:
            os.kill(n2.process.pid, signal.SIGCONT)
        await wait_for_gaps(n2, "run time")

        def asked():
            # A first look may fail while the woken process reconnects ("cannot reach the
            # snapshot store ...; retrying"); the node must get to the request by itself.
            health = n2.health()
            gaps = sorted((health or {}).get("gaps", {}).items())
            return health if gaps and "asked the cluster" in (gaps[0][1].get("recovery") or "") else None

        health = await wait_until(asked, 30, 0.2, "node 2 to ask the cluster for a snapshot")
        stream, gap = sorted(health["gaps"].items())[0]
        assert health["status"] == "unhealthy"
        assert gap["missing_from"] == held.get(stream, 0) + 1 and gap["missing_to"] >= gap["missing_from"]
        await asyncio.sleep(3)  # it stays held: nothing moves the position past the gap
        for gapped in health["gaps"]:
            assert positions(db2).get(gapped, 0) == held.get(gapped, 0), "the position moved past the gap"
        metrics = n2.metrics()
        assert f'marmot_stream_gap_entries{{stream="{stream}"}} {gap["missing"]}' in metrics, metrics
        assert "marmot_gaps " in metrics

        # -- `status` names it -------------------------------------------------------------
        cluster = config_from_flags(str(db2), 2, urls[0]).cluster
        text = render_status_text(cluster, [NodeStatus(
            "node-2", ProcessStatus("node/node-2", n2.process.pid, True), None,
            NodeHealth(503, n2.health()), ["unhealthy"],
        )])
        assert f"gap: {stream} lost entries {gap['missing_from']}..{gap['missing_to']}" in text, text

        # -- start-up: the same gap must not make the node exit --------------------------
        assert n2.terminate() == 0
        n2.start()
        health = await wait_for_gaps(n2, "start-up")
        assert stream in health["gaps"]
        await asyncio.sleep(2)
        assert n2.alive(), n2.log_path.read_text()[-3000:]

        # -- recovery without an operator: n1 (positions cover the gap) serves the request --
        assert n1.terminate() == 0
        n1.extra = flags(True)
        n1.start()
        await n1.wait_healthy()
        await n2.wait_healthy(120)
        execute(db1, "INSERT INTO kv VALUES ('after', 1)")
        await wait_converged([db1, db2])
        assert digest(db1) == digest(db2)
        assert not n2.health()["gaps"]
        await wait_until(lambda: asyncio.run(_requests(urls)) == {}, 30, 0.5, "n2 to withdraw its snapshot request")
    finally:
        for node in (n1, n2):
            node.terminate()
    for node in (n1, n2):
        text = node.log_path.read_text()
        assert "Traceback" not in text, text[-3000:]


async def _requests(urls) -> dict:
    from marmot_appliance.snapshots.requests import read_requests
    from marmot_appliance.snapshots.save import open_store

    nc = await nats.connect(servers=urls)
    try:
        cluster = config_from_flags("/dev/null", 1, urls[0]).cluster
        requests, _revision = await read_requests(await open_store(nc.jetstream(), cluster))
        return requests
    finally:
        await nc.close()


async def test_a_saver_serves_a_snapshot_request_with_periodic_saves_off(nats_server, wal_db):
    """The scheduler of a node whose positions cover a request saves a snapshot for it, even
    with every_entries and interval_s off; a request the newest snapshot covers is ignored."""
    from dataclasses import replace

    from marmot_appliance.snapshots.requests import request_snapshot
    from marmot_appliance.snapshots.save import open_store
    from marmot_appliance.snapshots.scheduler import SnapshotScheduler

    db = wal_db("saver.db", SCHEMA + "; CREATE TABLE _marmot_positions (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL);"
                " INSERT INTO _marmot_positions VALUES ('marmot-changes-1', 40);")
    config = config_from_flags(str(db), 1, nats_server.url, shards=1)
    cluster = replace(config.cluster, snapshots=replace(config.cluster.snapshots, every_entries=None, interval_s=None))
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        scheduler = SnapshotScheduler(js, cluster, config.node, db)
        assert scheduler.enabled
        assert await scheduler.check_once() is None  # nothing asked, nothing periodic: no save
        store = await open_store(js, cluster)
        await request_snapshot(store, "node-9", {"marmot-changes-1": 50})
        assert await scheduler.check_once() is None  # our positions (40) do not cover 50
        await request_snapshot(store, "node-9", {"marmot-changes-1": 30})
        saved = await scheduler.check_once()
        assert saved is not None and saved.positions["marmot-changes-1"] == 40
        assert await scheduler.check_once() is None  # the newest snapshot covers it now
    finally:
        await nc.close()
