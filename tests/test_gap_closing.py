"""Every node behind the retention at once: the gap is closed without a snapshot
(node/gap_closer.py; docs/reliability.md, finding 2).

Before: each node held its gapped stream and asked for a snapshot no node could ever save (all
were behind); the cluster stayed 503 for good (seen by the chaos harness with seed 2000). Now,
after waiting for a snapshot, each node asks every other node to publish its own rows again and
then passes the gap; everything converges.

Real nats-server, three real `marmot-appliance node` processes from one spec, real SQLite files.
Each node in turn is the only one running (the others paused with SIGSTOP and their consumers
deleted, so nothing is buffered for them) while its application writes three times the stream's
retention in separate transactions: when all run again, every node finds entries gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import nats
import pytest

from tests.harness import free_ports
from tests.replication_cluster import SubprocessNode, digest, execute, table_rows, wait_until

CLI = [sys.executable, "-m", "marmot_appliance"]
SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY, v)"
MAX_LOG_ENTRIES = 20
ROWS_PER_NODE = 3 * MAX_LOG_ENTRIES
STREAM = "marmot-changes-1"


def _spec(url: str, dbs: dict, ports: dict, snapshots: bool) -> str:
    nodes = "\n".join(
        f"  - {{name: {name}, id: {i}, host: 127.0.0.1, db: {db}, ports: {{metrics: {ports[name]}}}}}"
        for i, (name, db) in enumerate(dbs.items(), 1)
    )
    return textwrap.dedent(
        f"""\
        apiVersion: marmot-appliance/v1
        kind: Cluster
        name: gaps
        replication: {{shards: 1, log_replicas: 1, max_log_entries: {MAX_LOG_ENTRIES}}}
        snapshots: {{enabled: {str(snapshots).lower()}, every_entries: {MAX_LOG_ENTRIES // 2}}}
        nats:
          embedded: false
          urls: [{url}]
          auth: none
        nodes:
        """
    ) + nodes + "\n"


def _log_rows(db) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute('SELECT count(*) FROM "_marmot_log_kv"').fetchone()[0]
    finally:
        conn.close()


async def _delete_consumers(url: str) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for info in await js.consumers_info(STREAM):
            await js.delete_consumer(STREAM, info.name)
    finally:
        await nc.close()


@pytest.mark.parametrize("snapshots", [True, False], ids=["snapshots-on", "snapshots-off"])
async def test_every_node_behind_the_retention_converges_without_a_snapshot(nats_server, wal_db, tmp_path, snapshots):
    dbs = {name: wal_db(f"{name}.db", SCHEMA) for name in ("n1", "n2", "n3")}
    ports = dict(zip(dbs, free_ports(3)))
    spec = tmp_path / "cluster.yaml"
    spec.write_text(_spec(nats_server.url, dbs, ports, snapshots))
    nodes: dict[str, SubprocessNode] = {}
    for name in dbs:
        node = SubprocessNode(0, dbs[name], "", tmp_path / f"{name}.log", metrics_port=ports[name])
        with open(node.log_path, "ab") as log:
            node.process = subprocess.Popen(CLI + ["node", "--spec", str(spec), "--node", name], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        nodes[name] = node
    try:
        for node in nodes.values():
            await node.wait_healthy(120)
        execute(dbs["n1"], "INSERT INTO kv VALUES ('base', 0)")
        await wait_until(lambda: all(table_rows(db, "kv") == [("base", 0)] for db in dbs.values()), 30, 0.2,
                         "the base row everywhere")

        for name in ("n2", "n3"):
            os.kill(nodes[name].process.pid, signal.SIGSTOP)
        for writer in ("n1", "n2", "n3"):
            if writer != "n1":
                os.kill(nodes[writer].process.pid, signal.SIGCONT)
            await _delete_consumers(nats_server.url)  # nothing already sent waits for a paused node
            for i in range(ROWS_PER_NODE):
                execute(dbs[writer], "INSERT INTO kv VALUES (?, ?)", (f"{writer}-{i}", i))
                await asyncio.sleep(0.02)  # separate publish rounds: one stream entry each
            await wait_until(lambda: _log_rows(dbs[writer]) == 0, 60, 0.2, f"{writer} to publish its rows")
            if writer != "n3":
                os.kill(nodes[writer].process.pid, signal.SIGSTOP)
        for name in ("n1", "n2"):
            os.kill(nodes[name].process.pid, signal.SIGCONT)

        # Every node finds entries gone (each missed another node's writes)...
        for name, node in nodes.items():
            await wait_until(lambda node=node: (node.health() or {}).get("gaps") or _has_all(dbs[name]), 60, 0.2,
                             f"{name} to find its gap")
        # ... and all converge on every row without any snapshot.
        await wait_until(lambda: all(_has_all(db) for db in dbs.values()), 180, 0.5,
                         "every node to hold every row (gaps closed)")
        await wait_until(lambda: all((n.health() or {}).get("status") == "ok" for n in nodes.values()), 60, 0.5,
                         "every node healthy again")
        assert len({digest(db) for db in dbs.values()}) == 1
        closed = sum(_counter(node, "marmot_gaps_closed_by_republish_total") for node in nodes.values())
        assert closed >= 1, "no gap was closed by re-publishing"
    finally:
        for node in nodes.values():
            if node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGCONT)
            node.terminate()


def _has_all(db) -> bool:
    return len(table_rows(db, "kv")) == 1 + 3 * ROWS_PER_NODE


def _counter(node: SubprocessNode, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))
