"""A re-created stream is detected and replayed, never ignored (issue 10, case 3).

After JetStream's store is lost (or `destroy --purge` then `apply` with the databases kept), the
shard streams start again at sequence 1 while every node's stored position is higher: the new
messages used to be dropped as duplicates (lag 0, health ok, rows missing). Real nats-server,
real `marmot-appliance node` processes, real SQLite files.
"""

from __future__ import annotations

import nats

from tests.replication_cluster import (
    SubprocessNode,
    execute,
    log_rows,
    positions,
    table_rows,
    wait_converged,
    wait_until,
)

SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY, v)"
STREAM = "marmot-changes-1"


async def test_a_recreated_stream_is_replayed_and_own_rows_republished(nats_server, wal_db, tmp_path):
    db1, db2 = wal_db("n1.db", SCHEMA), wal_db("n2.db", SCHEMA)
    n1 = SubprocessNode(1, db1, nats_server.url, tmp_path / "n1.log", shards=1, replicas=1)
    n2 = SubprocessNode(2, db2, nats_server.url, tmp_path / "n2.log", shards=1, replicas=1)
    try:
        n1.start(), n2.start()
        await n1.wait_healthy()
        await n2.wait_healthy()
        for i in range(12):
            execute(db1, "INSERT INTO kv VALUES (?, ?)", (f"old-{i}", i))
        await wait_converged([db1, db2])
        # n2 writes a row that n1 never applies before the stream is lost.
        n1.terminate()
        execute(db2, "INSERT INTO kv VALUES ('only-on-2', 1)")
        await wait_until(lambda: log_rows(db2, "kv") == 0, 30, 0.1, "n2 to publish its row")
        n2.terminate()
        assert positions(db2)[STREAM] >= 2

        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().delete_stream(STREAM)  # the store is lost; the nodes keep their files
        finally:
            await nc.close()

        n1.start(), n2.start()
        await n1.wait_healthy()
        await n2.wait_healthy()
        execute(db1, "INSERT INTO kv VALUES ('new-1', 1)")  # sequence 1 or so of the new stream
        await wait_converged([db1, db2])
        assert ("new-1", 1) in table_rows(db2, "kv")
        assert ("only-on-2", 1) in table_rows(db1, "kv")  # re-published by its writer
        health = n2.health()
        assert health["status"] == "ok"
        reset = health["stream_resets"][STREAM]
        assert "re-created" in reset["reason"] and reset["previous_position"] >= 2
        assert f'marmot_stream_resets_total{{stream="{STREAM}"}} 1' in n2.metrics()
    finally:
        n1.terminate()
        n2.terminate()
    for node in (n1, n2):
        assert "Traceback" not in node.log_path.read_text()
