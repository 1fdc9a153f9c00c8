"""A node id names one database for its whole life (docs/replication.md, "Node identity").

Real nats-server, real `marmot-appliance node` processes, real SQLite files.
"""

from __future__ import annotations

import sqlite3
import subprocess

from tests.replication_cluster import InProcessNode, SubprocessNode, execute, table_rows, wait_until

SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY, v)"


def _pending_and_owner(db) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        owner = conn.execute("SELECT value FROM _marmot_meta WHERE key = 'node_id'").fetchone()[0]
        pending = conn.execute("SELECT count(*) FROM _marmot_log_kv").fetchone()[0]
    finally:
        conn.close()
    return int(owner), int(pending)


async def test_another_node_id_on_a_database_is_refused_and_pending_rows_kept(nats_server, wal_db, tmp_path):
    """Case 17: `node --node-id 3` on node 2's database used to rewrite its identity and discard
    its unpublished rows. Now: refused with a message (exit 1), nothing changed; with
    --allow-node-id-change the node runs as 3 and publishes those rows under id 3."""
    db = wal_db("n2.db", SCHEMA)
    node2 = await InProcessNode(2, db, nats_server.url, shards=1, replicas=1).start()
    await node2.stop()
    execute(db, "INSERT INTO kv VALUES (?, ?)", [(f"k{i}", i) for i in range(3)], many=True)
    assert _pending_and_owner(db) == (2, 3)  # written while node 2 was down: not published yet

    refused = SubprocessNode(3, db, nats_server.url, tmp_path / "n3-refused.log", shards=1, replicas=1).start()
    try:
        code = refused.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        refused.terminate()
        code = None
    output = (tmp_path / "n3-refused.log").read_text()
    assert code == 1, f"node id 3 was accepted on node 2's database: {output[-2000:]}"
    assert "belongs to node id 2" in output and "--allow-node-id-change" in output, output
    assert "Traceback" not in output, output
    assert _pending_and_owner(db) == (2, 3)  # identity and pending rows untouched

    other = wal_db("n1.db", SCHEMA)
    node1 = await InProcessNode(1, other, nats_server.url, shards=1, replicas=1).start()
    node3 = SubprocessNode(3, db, nats_server.url, tmp_path / "n3.log", shards=1, replicas=1,
                           extra=["--allow-node-id-change"]).start()
    try:
        await wait_until(lambda: len(table_rows(other, "kv")) == 3, what="node 2's pending rows on node 1")
        conn = sqlite3.connect(other)
        origins = {row[0] for row in conn.execute("SELECT origin FROM _marmot_ver_kv")}
        conn.close()
        assert origins == {3}
        assert _pending_and_owner(db) == (3, 0)
    finally:
        node3.terminate()
        await node1.stop()
    assert "Traceback" not in (tmp_path / "n3.log").read_text()
