"""A snapshot restore inside a running node with shards > 1 loses nothing (issue 10, case 1).

Real 3-server JetStream cluster, three real `marmot-appliance node` processes (shards 4), real
database files. Writers commit on nodes 1 and 2 the whole time. Each round freezes node 3
(SIGSTOP) and stops the server it is connected to, so what is written meanwhile never reaches
node 3; node 1 saves a snapshot and retention drops shard 1's log up to about it (max_msgs
lowered for an instant: shard streams refuse purges). Resumed,
node 3 reconnects, its shard-1 consumer finds its next entry gone and the node restores while
its other three consumers apply the backlog of the outage. Before the fix
the restore ran inside that one consumer while the others kept applying: an apply waiting on the
backup's lock then wrote its newer position into the restored file and the entries in between
were never replayed (rows lost, the databases never converge).

Timing-dependent: the test repeats the restore RESTORES_WANTED times.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest

from marmot_appliance.appliance.health import NodeHealth
from marmot_appliance.appliance.status import NodeStatus, ProcessStatus, render_status_text
from marmot_appliance.natsd.process import fetch_monitor_json, wait_for_meta_leader
from marmot_appliance.node.config import config_from_flags
from marmot_appliance.snapshots import SnapshotBusyError, save_snapshot
from tests.replication_cluster import SubprocessNode, digest, positions, wait_until

SCHEMA = "CREATE TABLE items (id TEXT PRIMARY KEY, origin INTEGER NOT NULL, body TEXT NOT NULL);"
SHARDS = 4
RESTORES_WANTED = 20
MAX_ROUNDS = 45  # a round whose node 3 caught up before the truncation restores nothing (under load: 1 in 3)
OUTAGE_S = 1.0
TRUNCATE_MARGIN = 20


def restores_logged(node: SubprocessNode) -> int:
    return node.log_path.read_text(errors="replace").count("restored snapshot ")


class Writer(threading.Thread):
    """Commits 3 rows at a time into one node's database until stopped; remembers every id."""

    def __init__(self, db: Path, origin: int):
        super().__init__(daemon=True, name=f"writer-{origin}")
        self.db = db
        self.origin = origin
        self.ids: list[str] = []
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = sqlite3.connect(self.db, timeout=60)
        try:
            n = 0
            while not self.stop_event.is_set():
                ids = [f"w{self.origin}-{n + k}" for k in range(3)]
                with conn:
                    conn.executemany("INSERT INTO items VALUES (?, ?, ?)",
                                     [(i, self.origin, "x" * 48) for i in ids])
                self.ids.extend(ids)
                n += 3
                self.stop_event.wait(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            conn.close()


def server_of(cluster, client_name: str) -> int | None:
    """Index of the server the named client is connected to now (None: not connected)."""
    for index, config in enumerate(cluster.configs):
        try:
            connz = fetch_monitor_json("127.0.0.1", config.monitor_port, "connz")
        except OSError:
            continue
        if any(c.get("name") == client_name for c in connz.get("connections") or ()):
            return index
    return None


async def settled(request, timeout_s: float = 60.0):
    """A JetStream request, repeated while the cluster elects a leader after a server stopped.

    A snapshot save also waits while another node holds the save lease: node 3 asks the cluster
    for a snapshot when it finds a gap, and node 1 or 2 may be saving that one right now."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await request()
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError,
                SnapshotBusyError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def truncate_to(js, stream: str, covered: int) -> int:
    """Let retention drop shard entries up to about `covered` (the snapshot's position), as a
    long outage would; returns the last entry dropped. Shard streams refuse purges
    (deny_purge), so retention does it: max_msgs is lowered for an instant, then restored.
    TRUNCATE_MARGIN entries below `covered` stay, for messages published meanwhile."""
    config = (await settled(lambda: js.stream_info(stream))).config
    last = (await settled(lambda: js.stream_info(stream))).state.last_seq
    keep = max(1, last - covered + TRUNCATE_MARGIN)
    await settled(lambda: js.update_stream(config.evolve(max_msgs=keep)))
    await settled(lambda: js.update_stream(config))
    return (await settled(lambda: js.stream_info(stream))).state.first_seq - 1


def ids_in(db: Path) -> set[str]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return {i for (i,) in conn.execute("SELECT id FROM items")}
    finally:
        conn.close()


@pytest.mark.timeout(1500)
async def test_restore_while_running_with_four_shards_loses_no_rows(nats_cluster, wal_db, tmp_path):
    dbs = [wal_db(f"n{i}.db", SCHEMA) for i in (1, 2, 3)]
    # Nodes 1 and 2 may use any server; node 3 only the third, which the test takes away.
    urls = [",".join(nats_cluster.urls[:2]), ",".join(nats_cluster.urls[:2]), nats_cluster.urls[2]]
    # Snapshots on: restores on a gap; a node saves only when another asks for a snapshot.
    nodes = [SubprocessNode(i, db, url, tmp_path / f"n{i}.log", shards=SHARDS, extra=["-enable-snapshot=true"])
             for i, db, url in zip((1, 2, 3), dbs, urls)]
    flags = dict(db_path=str(dbs[0]), node_id=1, nats_url=nats_cluster.url, shards=SHARDS, log_replicas=3,
                 max_log_entries=100_000)
    cluster, saver = config_from_flags(**flags).cluster, config_from_flags(**flags).node
    gap_stream = cluster.replication.stream_name(1)
    writers = [Writer(dbs[0], 1), Writer(dbs[1], 2)]
    nc = await nats.connect(servers=nats_cluster.urls[:2])
    js = nc.jetstream(timeout=30)
    restores = rounds = 0
    try:
        for n in nodes:
            n.start()
        for n in nodes:
            await n.wait_healthy(90)
        for w in writers:
            w.start()
        while restores < RESTORES_WANTED and rounds < MAX_ROUNDS:
            rounds += 1
            before = restores_logged(nodes[2])
            (server,) = await wait_until(lambda: [i for i in [server_of(nats_cluster, "marmot-node-3")] if i is not None],
                                         60, 0.2, "node 3 to be connected")
            # Node 3 frozen and its server gone: what was written from now on never reached it.
            nodes[2].signal(signal.SIGSTOP)
            try:
                await asyncio.to_thread(nats_cluster.processes[server].stop)
                await asyncio.sleep(OUTAGE_S)
                last = (await settled(lambda: js.stream_info(gap_stream))).state.last_seq
                await wait_until(lambda: positions(dbs[0]).get(gap_stream, 0) >= last, 60, 0.1,
                                 "node 1 to reach the newest shard-1 entry")
                info = await settled(lambda: save_snapshot(js, cluster, saver, dbs[0], force=True))
                purged_through = await truncate_to(js, gap_stream, info.positions[gap_stream])
                await asyncio.to_thread(nats_cluster.processes[server].start)
                await asyncio.to_thread(nats_cluster.processes[server].wait_listening, "127.0.0.1",
                                        nats_cluster.configs[server].client_port)
                await asyncio.to_thread(wait_for_meta_leader,
                                        [("127.0.0.1", c.monitor_port) for c in nats_cluster.configs])
            finally:
                nodes[2].signal(signal.SIGCONT)

            async def restored_or_caught_up() -> bool:
                if restores_logged(nodes[2]) > before:
                    return True
                return positions(dbs[2]).get(gap_stream, 0) >= purged_through  # it had everything before the truncation

            await wait_until(restored_or_caught_up, 120, 0.2, "node 3 to restore or catch up")
            if restores_logged(nodes[2]) > before:
                restores += 1
        assert restores >= RESTORES_WANTED, f"only {restores} restore(s) in {rounds} rounds"
        for w in writers:
            w.stop_event.set()
            w.join(30)
            assert w.error is None, w.error
        written = {i for w in writers for i in w.ids}

        def converged() -> bool:
            return len({digest(db) for db in dbs}) == 1

        try:
            await wait_until(converged, 120, 0.5, "all three databases to converge")
        finally:
            missing = {f"n{k + 1}": len(written - ids_in(db)) for k, db in enumerate(dbs)}
            print(f"{restores} restores in {rounds} rounds; rows missing per node: {missing}")
        assert missing == {"n1": 0, "n2": 0, "n3": 0}, f"rows lost after {restores} restores: {missing}"

        # What an operator sees: /health, `status`, /metrics.
        health = nodes[2].health()
        assert health["status"] == "ok" and health["restore"]["state"] == "idle"
        assert health["restore"]["restores"] >= RESTORES_WANTED
        text = render_status_text(cluster, [NodeStatus(
            "node-3", ProcessStatus("node/node-3", nodes[2].process.pid, True), None, NodeHealth(200, health), [],
        )])
        assert f"snapshot restores while running: {health['restore']['restores']}" in text, text
        metrics = nodes[2].metrics()
        assert f"marmot_snapshot_restores_total {float(health['restore']['restores'])}" in metrics, metrics
        assert "marmot_snapshot_restore_in_progress 0" in metrics
    finally:
        for w in writers:
            w.stop_event.set()
        for n in nodes:
            n.signal(signal.SIGCONT)
            n.terminate()
        for process in nats_cluster.processes:
            if process.pid is None or process.process.poll() is not None:
                process.start()
        await nc.close()
