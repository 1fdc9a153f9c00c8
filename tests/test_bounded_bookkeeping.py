"""Bounded bookkeeping (issue 14; docs/capture.md, "Bounded bookkeeping"), on a real node process
and a real nats-server:

- dead letters past `replication.max_dead_letters`: the oldest go, counted
  (`marmot_dead_letters_dropped_total`, /health `dead_letters_dropped`) and logged;
- a change log that does not drain (NATS gone while the application writes) raises the alarm:
  /health 503 with `change_log.alarm`, `marmot_change_log_alarm 1` and the oldest row's age; it
  clears once publishing catches up, and no row was dropped meanwhile;
- the in-memory set of own publishes stays under its cap.
"""

from __future__ import annotations

import sqlite3

import nats

from marmot_appliance.appliance.health import NodeHealth
from marmot_appliance.appliance.status import NodeStatus, ProcessStatus, render_status_text
from marmot_appliance.replication.own_publishes import OwnPublishes
from marmot_appliance.spec.loader import load_cluster
from tests.harness import free_ports, settled
from tests.replication_cluster import SubprocessNode, execute, external_nats_spec, wait_until

SCHEMA = "CREATE TABLE notes (k TEXT PRIMARY KEY, v);"


class OneNode:
    def __init__(self, tmp_path, nats_server, wal_db, replication: str):
        self.db = wal_db("n1.db", SCHEMA)
        self.port = free_ports(1)[0]
        self.spec = tmp_path / "cluster.yaml"
        self.log = tmp_path / "n1.log"
        self.spec.write_text(external_nats_spec("bounded", nats_server.urls[:1], {"n1": self.db}, {"n1": self.port},
                                                replication=f"{{shards: 1, log_replicas: 1, {replication}}}"))
        self.node = SubprocessNode.from_spec(self.spec, "n1", self.db, self.log, self.port)

    async def start(self) -> None:
        self.node.start()
        await self.node.wait_healthy(120)

    def health(self) -> dict:
        return self.node.health() or {}

    def metrics(self) -> str:
        return self.node.metrics()

    def stop(self) -> None:
        self.node.terminate()


def _count(db, sql: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


async def test_dead_letters_past_the_cap_drop_the_oldest_counted_and_logged(nats_server, wal_db, tmp_path):
    node = OneNode(tmp_path, nats_server, wal_db, "max_dead_letters: 3")
    try:
        await node.start()
        nc = await nats.connect(nats_server.urls[0])
        try:
            js = nc.jetstream(timeout=10)
            for i in range(7):
                # Undecodable messages from another origin: each one a dead letter.
                await js.publish("marmot-change-log-1.7", b"\x01\x01\x09garbage" + bytes([i]),
                                 headers={"Marmot-Origin": "7"})
        finally:
            await nc.close()
        await wait_until(lambda: node.health().get("dead_letters_dropped", 0) >= 4, 60,
                         what="the four oldest dead letters dropped")
        assert _count(node.db, "SELECT count(*) FROM _marmot_dead_letters") == 3
        # The newest three are the ones kept.
        assert _count(node.db, "SELECT min(seq) FROM _marmot_dead_letters") == 5
        assert "\nmarmot_dead_letters_dropped_total 4.0" in node.metrics()
        assert "dropped the" in node.log.read_text() and "max_dead_letters=3" in node.log.read_text()
        assert node.health()["status"] == "ok"  # a cap at work is not a failure
        text = render_status_text(load_cluster(node.spec), [NodeStatus(
            "n1", ProcessStatus("node/n1", node.node.process.pid, True), None, NodeHealth(200, node.health()), [])])
        assert "dead letters dropped past replication.max_dead_letters: 4" in text, text
    finally:
        node.stop()


async def test_a_change_log_that_does_not_drain_raises_the_alarm_and_keeps_every_row(nats_server, wal_db, tmp_path):
    node = OneNode(tmp_path, nats_server, wal_db, "change_log_alarm_age_s: 2, change_log_alarm_rows: 50")
    try:
        await node.start()
        metrics = node.metrics()
        assert "\nmarmot_change_log_alarm 0.0" in metrics and "\nmarmot_healthy 1.0" in metrics, metrics
        nats_server.processes[0].stop()
        execute(node.db, "INSERT INTO notes VALUES (?, ?)", [(f"k{i}", i) for i in range(100)], many=True)

        def alarmed():
            health = node.health()
            return health.get("status") == "unhealthy" and (health.get("change_log") or {}).get("alarm")

        await wait_until(alarmed, 60, what="the change-log alarm")
        change_log = node.health()["change_log"]
        assert change_log["pending_rows"] == 100 and "change_log_alarm_rows=50" in change_log["alarm"], change_log
        await wait_until(lambda: "oldest pending row" in (node.health().get("change_log") or {}).get("alarm", ""), 60,
                         what="the age part of the alarm")
        metrics = node.metrics()
        assert "\nmarmot_change_log_alarm 1.0" in metrics and "\nmarmot_healthy 0.0" in metrics, metrics
        age = float(metrics.split("\nmarmot_change_log_oldest_age_seconds ")[1].split()[0])
        assert age > 2, metrics
        assert "change log not draining" in node.log.read_text()
        text = render_status_text(load_cluster(node.spec), [NodeStatus(
            "n1", ProcessStatus("node/n1", node.node.process.pid, True), None, NodeHealth(503, node.health()), ["unhealthy"])])
        assert "change log not draining: 100 captured rows pending" in text, text

        nats_server.processes[0].start()
        nats_server.processes[0].wait_listening("127.0.0.1", nats_server.configs[0].client_port)
        await wait_until(lambda: node.health().get("status") == "ok" and not node.health()["change_log"]["alarm"], 120,
                         what="the alarm to clear once publishing caught up")
        assert node.health()["change_log"]["pending_rows"] == 0
        assert "\nmarmot_change_log_alarm 0.0" in node.metrics()
        nc = await nats.connect(nats_server.urls[0])
        try:
            info = await settled(lambda: nc.jetstream(timeout=10).stream_info("marmot-changes-1"))
            assert info.state.messages >= 1  # the rows went out, none was dropped from the log
        finally:
            await nc.close()
    finally:
        node.stop()


def test_own_publishes_stay_under_their_cap():
    own = OwnPublishes(max_per_stream=1000)
    for seq in range(1, 10_001):
        own.add("s", seq)
    assert own.tracked() <= 1000
    # The newest are kept (the consumer reaches them next); the oldest were forgotten.
    assert own.take("s", 10_000) and not own.take("s", 1)
