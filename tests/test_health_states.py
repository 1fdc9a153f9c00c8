"""/health says "starting" or "restoring" (HTTP 503) while the node is not consuming every stream.

Real nats-servers, real `marmot-appliance node` processes, real SQLite files. Before the fix
/health answered 200 "ok" while a snapshot restore was pending or running inside the node (every
consumer and the publisher paused) and while the shard consumers had not subscribed yet.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import nats

from marmot_appliance.appliance.health import NodeHealth
from marmot_appliance.appliance.status import NodeStatus, ProcessStatus, render_status_text
from marmot_appliance.natsd.config import ClientUser, ServerConfig, render_server_config
from marmot_appliance.natsd.permissions import node_publish_allow
from marmot_appliance.natsd.process import NatsServerProcess
from marmot_appliance.node.config import config_from_flags
from marmot_appliance.snapshots import save_snapshot
from tests.harness import free_ports, settled
from tests.replication_cluster import (
    SubprocessNode,
    execute,
    log_rows,
    positions,
    wait_converged,
    wait_until,
)

SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY, v)"
MAX_LOG_ENTRIES = 20
STREAM = "marmot-changes-1"


class HealthWatcher(threading.Thread):
    """Reads a node's /health over and over; keeps every (HTTP status, body) it got."""

    def __init__(self, node: SubprocessNode):
        super().__init__(daemon=True, name=f"health-{node.node_id}")
        self.node = node
        self.replies: list[tuple[int, dict]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            code, body = self.node.health_reply()
            if code is not None and body is not None:
                self.replies.append((code, body))
            self.stop_event.wait(0.01)

    def during_restore(self) -> list[tuple[int, dict]]:
        return [(code, body) for code, body in self.replies if (body.get("restore") or {}).get("state") != "idle"]


async def test_health_is_503_restoring_while_a_running_node_restores_a_snapshot(nats_cluster, wal_db, tmp_path):
    db1, db2 = wal_db("n1.db", SCHEMA), wal_db("n2.db", SCHEMA)
    urls = nats_cluster.urls
    flags = ["-max-log-entries", str(MAX_LOG_ENTRIES)]
    n1 = SubprocessNode(1, db1, ",".join(urls), tmp_path / "n1.log", shards=1, extra=flags).start()
    n2 = SubprocessNode(2, db2, ",".join(urls), tmp_path / "n2.log", shards=1,
                        extra=[*flags, "-enable-snapshot=true"]).start()
    watcher = HealthWatcher(n2)
    nc = await nats.connect(servers=urls)
    js = nc.jetstream(timeout=30)
    try:
        await n1.wait_healthy()
        await n2.wait_healthy()
        execute(db1, "INSERT INTO kv VALUES ('before', 0)")
        await wait_converged([db1, db2])

        # Node 2 frozen and its consumer gone while node 1 writes far more than the stream
        # keeps: when it wakes, its next entry is gone and a kept snapshot covers the gap.
        n2.signal(19)  # SIGSTOP
        try:
            for info in await js.consumers_info(STREAM):
                await js.delete_consumer(STREAM, info.name)
            for i in range(8 * MAX_LOG_ENTRIES):
                execute(db1, "INSERT INTO kv VALUES (?, ?)", (f"k{i}", i))
                if i % 10 == 0:
                    await asyncio.sleep(0.05)  # many messages
            await wait_until(lambda: log_rows(db1, "kv") == 0, 60, 0.2, "node 1 to publish everything")
            last = (await settled(lambda: js.stream_info(STREAM))).state.last_seq
            await wait_until(lambda: positions(db1).get(STREAM, 0) >= last, 60, 0.2, "node 1's own position")
            config = config_from_flags(str(db1), 1, ",".join(urls), shards=1, max_log_entries=MAX_LOG_ENTRIES)
            await save_snapshot(js, config.cluster, config.node, db1, force=True)
            watcher.start()
        finally:
            n2.signal(18)  # SIGCONT

        def restoring() -> bool:
            return bool(watcher.during_restore())

        await wait_until(restoring, 60, 0.01, "node 2's /health to show the restore")
        # Hold the restore at its last step (the backup into the live file waits for the write
        # lock) so /health is read several times while it runs; the consumers are paused now.
        lock = sqlite3.connect(db2, timeout=60, isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            seen = len(watcher.replies)
            await wait_until(lambda: len(watcher.replies) >= seen + 20, 30, 0.05, "more /health replies")
        finally:
            lock.execute("COMMIT")
            lock.close()
        await n2.wait_healthy(90)
        watcher.stop_event.set()
        watcher.join(10)
        during = watcher.during_restore()
        assert during
        for code, body in during:
            assert (code, body["status"]) == (503, "restoring"), body
            assert "snapshot restore" in body["reason"] and STREAM in body["reason"], body["reason"]
        assert "restored snapshot " in n2.log_path.read_text()

        # `status` says it in words.
        code, body = during[-1]
        text = render_status_text(config.cluster, [NodeStatus(
            "node-2", ProcessStatus("node/node-2", n2.process.pid, True), None, NodeHealth(code, body),
            [NodeHealth(code, body).describe()],
        )])
        assert "node-2: RESTORING" in text and f"problem: /health answered 503: restoring: {body['reason']}" in text, text

        execute(db1, "INSERT INTO kv VALUES ('after', 1)")
        await wait_converged([db1, db2])
    finally:
        watcher.stop_event.set()
        await nc.close()
        for node in (n1, n2):
            node.signal(18)
            node.terminate()
    for node in (n1, n2):
        assert "Traceback" not in node.log_path.read_text()


async def test_health_is_503_starting_until_the_consumers_have_subscribed(wal_db, tmp_path):
    """A node identity that may not create consumers: everything else works (NATS connected,
    streams there, capture installed), but no stream is consumed; /health must not say ok."""
    db = wal_db("n1.db", SCHEMA)
    flags_cluster = config_from_flags(str(db), 1, "nats://127.0.0.1:4222", shards=1).cluster
    allow = tuple(s for s in node_publish_allow(flags_cluster, [1]) if not s.startswith("$JS.API.CONSUMER."))
    client, monitor = free_ports(2)
    config = ServerConfig(server_name="s1", host="127.0.0.1", client_port=client, monitor_port=monitor,
                          store_dir=str(tmp_path / "js"),
                          users=(ClientUser(user="node1", password="secret-1", publish_allow=allow,
                                            allow_responses=True),))
    conf = tmp_path / "s1.conf"
    conf.write_text(render_server_config(config))
    server = NatsServerProcess(config_path=conf, log_path=tmp_path / "s1.log")
    server.start()
    node = SubprocessNode(1, db, f"nats://node1:secret-1@127.0.0.1:{client}", tmp_path / "n1.log", shards=1,
                          replicas=1)
    try:
        server.wait_listening("127.0.0.1", client)
        node.start()

        def consuming_refused():
            if not node.alive():
                raise AssertionError(node.log_path.read_text()[-3000:])
            code, body = node.health_reply()
            return (code, body) if body and body["started"] and body["nats"]["connected"] else None

        code, body = await wait_until(consuming_refused, 60, 0.1, "node 1 to finish starting")
        # A few more looks: the consumer keeps failing to subscribe, /health keeps saying so.
        for _ in range(5):
            code, body = node.health_reply()
            assert (code, body["status"]) == (503, "starting"), body
            assert "not subscribed" in body["reason"] and STREAM in body["reason"], body["reason"]
            await asyncio.sleep(0.2)
    finally:
        node.terminate()
        server.stop()
