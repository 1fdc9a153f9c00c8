"""A node id names one database for its whole life (docs/replication.md, "Node identity").

Real nats-server, real `marmot-appliance node` processes, real SQLite files.
"""

from __future__ import annotations

import sqlite3
import subprocess

from tests.harness import free_ports
from tests.replication_cluster import InProcessNode, SubprocessNode, execute, node_command, table_rows, wait_until

SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY, v)"


def _pending_and_owner(db) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        owner = conn.execute("SELECT value FROM _marmot_meta WHERE key = 'node_id'").fetchone()[0]
        pending = conn.execute("SELECT count(*) FROM _marmot_log_kv").fetchone()[0]
    finally:
        conn.close()
    return int(owner), int(pending)


def _run_node(db, nats_url, node_id: int, log_path, extra: list[str]) -> subprocess.Popen:
    argv = node_command(node_id, db, nats_url, shards=1, replicas=1, metrics_port=free_ports(1)[0], extra=extra)
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()


async def test_another_node_id_on_a_database_is_refused_and_pending_rows_kept(nats_server, wal_db, tmp_path):
    """Case 17: `node --node-id 3` on node 2's database used to rewrite its identity and discard
    its unpublished rows. Now: refused with a message (exit 1), nothing changed; with
    --allow-node-id-change the node runs as 3 and publishes those rows under id 3."""
    db = wal_db("n2.db", SCHEMA)
    node2 = await InProcessNode(2, db, nats_server.url, shards=1, replicas=1).start()
    await node2.stop()
    execute(db, "INSERT INTO kv VALUES (?, ?)", [(f"k{i}", i) for i in range(3)], many=True)
    assert _pending_and_owner(db) == (2, 3)  # written while node 2 was down: not published yet

    proc = _run_node(db, nats_server.url, 3, tmp_path / "n3-refused.log", [])
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(timeout=60)
        code = None
    output = (tmp_path / "n3-refused.log").read_text()
    assert code == 1, f"node id 3 was accepted on node 2's database: {output[-2000:]}"
    assert "belongs to node id 2" in output and "--allow-node-id-change" in output, output
    assert "Traceback" not in output, output
    assert _pending_and_owner(db) == (2, 3)  # identity and pending rows untouched

    other = wal_db("n1.db", SCHEMA)
    node1 = await InProcessNode(1, other, nats_server.url, shards=1, replicas=1).start()
    proc = _run_node(db, nats_server.url, 3, tmp_path / "n3.log", ["--allow-node-id-change"])
    try:
        await wait_until(lambda: len(table_rows(other, "kv")) == 3, what="node 2's pending rows on node 1")
        conn = sqlite3.connect(other)
        origins = {row[0] for row in conn.execute("SELECT origin FROM _marmot_ver_kv")}
        conn.close()
        assert origins == {3}
        assert _pending_and_owner(db) == (3, 0)
    finally:
        probe = SubprocessNode(3, db, "", tmp_path / "n3.log")
        probe.process = proc
        probe.terminate()
        await node1.stop()
    assert "Traceback" not in (tmp_path / "n3.log").read_text()
