"""Tombstone collection (issue 14) and its dangerous interleavings, on real node processes and a
real nats-server (docs/capture.md, "Tombstone collection").

- tombstones go once every node has passed them, and a late duplicate of an old insert (the
  same message published again, as a repair or a replay would) does not bring the row back;
- a node down across the collection holds it back: its older write, published when it returns,
  loses against the tombstone everywhere;
- a node restored from the oldest kept snapshot (taken before the deletes) after the others
  collected: it replays the deletes from the snapshot's positions and keeps no deleted row;
- a node down past replication.tombstone_node_timeout_s no longer holds collection back; when
  it returns, its older write is set aside (dead letter) and it is re-seeded from a snapshot
  instead of resurrecting the row on itself.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time

import nats

from marmot_appliance.appliance.health import NodeHealth
from marmot_appliance.appliance.status import NodeStatus, ProcessStatus, render_status_text
from marmot_appliance.spec.loader import load_cluster
from tests.harness import free_ports
from tests.replication_cluster import SubprocessNode, execute, external_nats_spec, table_rows, wait_until

CLI = [sys.executable, "-m", "marmot_appliance"]
SCHEMA = "CREATE TABLE jobs (k TEXT PRIMARY KEY, v);"


class Cluster:
    def __init__(self, tmp_path, nats_server, wal_db, *, node_timeout_s: float = 3600, snapshots: str = "{enabled: false}"):
        self.tmp = tmp_path
        self.dbs = {name: wal_db(f"{name}.db", SCHEMA) for name in ("n1", "n2", "n3")}
        self.ports = dict(zip(self.dbs, free_ports(3)))
        self.spec = tmp_path / "cluster.yaml"
        replication = ("{shards: 1, log_replicas: 1, tombstone_interval_s: 0.5, "
                       f"tombstone_node_timeout_s: {node_timeout_s}}}")
        self.spec.write_text(external_nats_spec("tombstones", nats_server.urls, self.dbs, self.ports,
                                                replication=replication, snapshots=snapshots))
        self.nodes = {name: SubprocessNode.from_spec(self.spec, name, db, tmp_path / f"{name}.log", self.ports[name])
                      for name, db in self.dbs.items()}
        self.url = nats_server.urls[0]

    async def start(self, *names: str) -> None:
        for name in names or tuple(self.dbs):
            self.nodes[name].start()
        for name in names or tuple(self.dbs):
            await self.nodes[name].wait_healthy(120)

    def stop(self, name: str) -> None:
        self.nodes[name].terminate()

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.terminate()

    def health(self, name: str) -> dict:
        return self.nodes[name].health() or {}


def tombstones(db) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute('SELECT count(*) FROM "_marmot_ver_jobs" WHERE deleted = 1').fetchone()[0]
    finally:
        conn.close()


def horizon_of(db) -> int:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT value FROM _marmot_meta WHERE key = 'tombstones_collected_through'").fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


async def _republish_first_entry(url: str) -> tuple[str, int]:
    """A late duplicate of the oldest change on the stream: the very message, published again
    (a replay or a repair does this), under a new message id so JetStream does not drop it.
    Returns (stream, sequence of the duplicate)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = next(info.config.name for info in await js.streams_info()
                      if info.config.name.startswith("marmot-changes-"))
        first = await js.get_msg(stream, 1)
        headers = {k: v for k, v in (first.headers or {}).items() if k != "Nats-Msg-Id"}
        headers["Nats-Msg-Id"] = f"late-duplicate-{time.time()}"
        ack = await js.publish(first.subject, first.data, headers=headers)
        return stream, ack.seq
    finally:
        await nc.close()


def _metrics_text(cluster: Cluster, name: str) -> str:
    return cluster.nodes[name].metrics()


def _snapshot_cli(cluster: Cluster, *args: str) -> str:
    done = subprocess.run(CLI + ["snapshot", *args, "--spec", str(cluster.spec)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def _all_rows(cluster: Cluster, expected: list[tuple]) -> None:
    await wait_until(lambda: all(table_rows(db, "jobs") == expected for db in cluster.dbs.values()),
                     what=f"every node to hold {expected}")


async def test_collected_tombstones_stay_dead_against_a_late_duplicate(nats_server, wal_db, tmp_path):
    cluster = Cluster(tmp_path, nats_server, wal_db)
    try:
        await cluster.start()
        # The bookkeeping and tombstone series exist from start-up (alerts and dashboards
        # need them before the first event; monitoring/ queries them).
        metrics = _metrics_text(cluster, "n1")
        for series in ("marmot_bookkeeping_bytes ", "marmot_tombstones ", "marmot_tombstone_horizon ",
                       "marmot_tombstones_collected_total ", "marmot_reseeds_total "):
            assert f"\n{series}" in metrics, (series, metrics)
        await wait_until(lambda: 'marmot_bookkeeping_rows{table="_marmot_ver_jobs"}' in _metrics_text(cluster, "n1"),
                         what="the per-table bookkeeping rows after the first round")
        execute(cluster.dbs["n1"], "INSERT INTO jobs VALUES (?, ?)", [(f"job{i}", i) for i in range(20)], many=True)
        await wait_until(lambda: all(len(table_rows(db, "jobs")) == 20 for db in cluster.dbs.values()),
                         what="the inserts everywhere")
        execute(cluster.dbs["n1"], "DELETE FROM jobs")
        await _all_rows(cluster, [])
        # Short-lived rows leave nothing behind once every node has passed them.
        await wait_until(lambda: all(tombstones(db) == 0 for db in cluster.dbs.values()), 60,
                         what="the tombstones collected on every node")
        await wait_until(lambda: cluster.health("n1")["tombstones"]["collected_total"] >= 20
                         and cluster.health("n1")["bookkeeping"]["tombstones"] == 0,
                         what="status to show the collection")
        metrics = _metrics_text(cluster, "n1")
        assert "\nmarmot_tombstones 0.0" in metrics and "\nmarmot_tombstones_collected_total 20.0" in metrics, metrics
        body = cluster.health("n1")
        text = render_status_text(load_cluster(cluster.spec), [NodeStatus(
            "n1", ProcessStatus("node/n1", cluster.nodes["n1"].process.pid, True), None, NodeHealth(200, body), [])])
        assert f"bookkeeping: {body['bookkeeping']['rows']} row(s)" in text and "tombstones kept: 0" in text, text
        assert "tombstones collected: 20;" in text, text

        stream, seq = await _republish_first_entry(cluster.url)

        def applied_everywhere():
            return all(cluster.health(name).get("applied", {}).get(stream, 0) >= seq
                       for name in ("n2", "n3"))

        await wait_until(applied_everywhere, what="the duplicate applied by the other nodes")
        await asyncio.sleep(1)
        for db in cluster.dbs.values():
            assert table_rows(db, "jobs") == [], "a collected tombstone let a deleted row come back"
    finally:
        cluster.stop_all()


async def test_a_node_down_across_the_collection_holds_it_back(nats_server, wal_db, tmp_path):
    """n3 is down (its record fresh, within the timeout) while n1 deletes a key; n3's application
    then updates the key, newer than the delete. Its record still says it has not published past
    the moment it stopped, so n1 and n2 keep the tombstone; when n3 returns, its update wins on
    every node. Had they collected past it, the update would be stale on them and live on n3."""
    cluster = Cluster(tmp_path, nats_server, wal_db)
    try:
        await cluster.start()
        execute(cluster.dbs["n1"], "INSERT INTO jobs VALUES ('k', 1)")
        await _all_rows(cluster, [("k", 1)])
        await wait_until(lambda: (cluster.health("n3").get("tombstones") or {}).get("last_round"),
                         what="n3 to publish its horizon record")
        cluster.stop("n3")
        execute(cluster.dbs["n1"], "DELETE FROM jobs WHERE k = 'k'")
        await wait_until(lambda: table_rows(cluster.dbs["n2"], "jobs") == [], what="the delete on n2")
        # n3's application writes while its node is down: captured, not published; newer than
        # the delete n3 has not seen.
        await asyncio.sleep(0.05)
        execute(cluster.dbs["n3"], "UPDATE jobs SET v = 3 WHERE k = 'k'")
        # Several rounds: n3's record says it has not published past its write, so the tombstone stays.
        await asyncio.sleep(4)
        assert tombstones(cluster.dbs["n1"]) == 1 and tombstones(cluster.dbs["n2"]) == 1
        await cluster.start("n3")
        await _all_rows(cluster, [("k", 3)])
        await wait_until(lambda: all(tombstones(db) == 0 for db in cluster.dbs.values()), 60,
                         what="no tombstone left once n3's newer update arrived")
        await asyncio.sleep(1)
        await _all_rows(cluster, [("k", 3)])
    finally:
        cluster.stop_all()


async def test_a_node_restored_from_the_oldest_kept_snapshot_after_collection(nats_server, wal_db, tmp_path):
    """The oldest kept snapshot predates the deletes; n1 and n2 collected the tombstones since.
    n3, restored from it, replays the deletes from the snapshot's positions (its horizon is the
    snapshot's, not the cluster's) and keeps no deleted row, also against a late duplicate of
    the old insert afterwards; and it collects its own tombstones again."""
    cluster = Cluster(tmp_path, nats_server, wal_db,
                      snapshots="{enabled: true, interval_s: null, every_entries: null, keep: 2}")
    try:
        await cluster.start()
        execute(cluster.dbs["n1"], "INSERT INTO jobs VALUES (?, ?)", [(f"job{i}", i) for i in range(10)], many=True)
        await wait_until(lambda: all(len(table_rows(db, "jobs")) == 10 for db in cluster.dbs.values()),
                         what="the inserts everywhere")
        _snapshot_cli(cluster, "save", "--node", "n1")
        execute(cluster.dbs["n1"], "DELETE FROM jobs WHERE k <> 'job0'")
        await _all_rows(cluster, [("job0", 0)])
        await wait_until(lambda: all(tombstones(db) == 0 and horizon_of(db) > 0 for db in cluster.dbs.values()), 60,
                         what="the tombstones collected on every node")
        _snapshot_cli(cluster, "save", "--node", "n2")
        kept = json.loads(_snapshot_cli(cluster, "list", "--output", "json"))
        assert len(kept) == 2, kept
        oldest = min(kept, key=lambda snapshot: snapshot["generation"])

        cluster.stop("n3")
        _snapshot_cli(cluster, "restore", "--node", "n3", "--name", oldest["name"])
        assert len(table_rows(cluster.dbs["n3"], "jobs")) == 10, "n3 should hold the snapshot's rows"
        await cluster.start("n3")
        await _all_rows(cluster, [("job0", 0)])
        await wait_until(lambda: tombstones(cluster.dbs["n3"]) == 0, 60, what="n3 to collect its tombstones again")

        stream, seq = await _republish_first_entry(cluster.url)
        await wait_until(lambda: all(cluster.health(name).get("applied", {}).get(stream, 0) >= seq
                                     for name in ("n2", "n3")), what="the duplicate applied by the other nodes")
        await asyncio.sleep(1)
        await _all_rows(cluster, [("job0", 0)])
    finally:
        cluster.stop_all()


async def test_a_node_down_past_the_horizon_is_reseeded(nats_server, wal_db, tmp_path):
    cluster = Cluster(tmp_path, nats_server, wal_db, node_timeout_s=3,
                      snapshots="{enabled: true, interval_s: 1, every_entries: null, keep: 2}")
    try:
        await cluster.start()
        execute(cluster.dbs["n1"], "INSERT INTO jobs VALUES ('k', 1), ('stays', 2)")
        await _all_rows(cluster, [("k", 1), ("stays", 2)])
        await wait_until(lambda: (cluster.health("n3").get("tombstones") or {}).get("last_round"),
                         what="n3 to publish its horizon record")
        cluster.stop("n3")
        execute(cluster.dbs["n1"], "DELETE FROM jobs WHERE k = 'k'")
        await wait_until(lambda: table_rows(cluster.dbs["n2"], "jobs") == [("stays", 2)], what="the delete on n2")
        # n3, down, never saw the delete: its application updates the row, newer than the
        # delete. Published on its return after n1 and n2 collected past it, the update would be
        # stale there and live on n3: the copies would differ for good.
        execute(cluster.dbs["n3"], "UPDATE jobs SET v = 3 WHERE k = 'k'")
        await asyncio.sleep(1)
        # n3's record goes stale: n1 and n2 collect without it.
        conn = sqlite3.connect(cluster.dbs["n3"])
        try:
            written = conn.execute('SELECT max(id) FROM "_marmot_log_jobs"').fetchone()[0]
        finally:
            conn.close()
        await wait_until(lambda: all(tombstones(cluster.dbs[name]) == 0 and horizon_of(cluster.dbs[name]) >= written
                                     for name in ("n1", "n2")), 60,
                         what="n1 and n2 to collect while n3 is down past the timeout")
        await asyncio.sleep(2)  # a snapshot that reflects the delete
        await cluster.start("n3")
        await _all_rows(cluster, [("stays", 2)])
        await wait_until(lambda: (cluster.health("n3").get("tombstones") or {}).get("reseeded"),
                         what="n3 to report its re-seed")
        reseeded = cluster.health("n3")["tombstones"]["reseeded"]
        assert reseeded["rows_set_aside"] == 1 and reseeded["snapshot"], reseeded
        assert "\nmarmot_dead_letters_total 1.0\n" in _metrics_text(cluster, "n3")  # the set-aside row
        conn = sqlite3.connect(cluster.dbs["n3"])
        try:
            reasons = [row[0] for row in conn.execute("SELECT reason FROM _marmot_dead_letters")]
        finally:
            conn.close()
        # The restored file is another node's copy: the set-aside row went with the old file
        # (kept beside it as the pre-restore copy), so it is looked up in the log of n3.
        assert cluster.health("n3")["status"] == "ok"
        assert reasons == [] or any("tombstone horizon" in reason for reason in reasons)
    finally:
        cluster.stop_all()
