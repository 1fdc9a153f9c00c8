"""Parked rows cost nothing while the schema stays the same, and they are bounded (issue 10 case 11).

Node n2 lacks a table that n1 writes to, so n2 parks those rows. The maintenance loop used to
decode every parked row inside BEGIN IMMEDIATE every 2 s (150k parked rows held the write lock
559 ms every 2 s) and the park grew without bound. Now a retry happens only when a table's
schema changed, chunk by chunk, and `replication.max_parked_rows` bounds the park: the overflow
is dead-lettered and counted. Real node processes in spec mode (the setting is a spec setting).
"""

from __future__ import annotations

import asyncio
import sqlite3

from tests.harness import free_ports
from tests.replication_cluster import SubprocessNode, execute, external_nats_spec, table_rows, wait_until

MAX_PARKED = 50


def _metric(node: SubprocessNode, name: str) -> float:
    for line in node.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def _count(db, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


async def test_parked_rows_wait_for_their_table_and_are_bounded(nats_server, wal_db, tmp_path):
    dbs = {"n1": wal_db("n1.db", "CREATE TABLE later (k TEXT PRIMARY KEY, v);"), "n2": wal_db("n2.db")}
    ports = dict(zip(dbs, free_ports(2)))
    spec = tmp_path / "cluster.yaml"
    spec.write_text(external_nats_spec("parked", nats_server.urls, dbs, ports,
                                       replication=f"{{shards: 1, log_replicas: 1, max_parked_rows: {MAX_PARKED}}}"))
    nodes = [SubprocessNode.from_spec(spec, name, db, tmp_path / f"{name}.log", ports[name]) for name, db in dbs.items()]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            await node.wait_healthy()
        n2 = nodes[1]
        execute(dbs["n1"], "INSERT INTO later VALUES (?, ?)", [(f"k{i:03}", i) for i in range(80)], many=True)
        await wait_until(lambda: _metric(n2, "marmot_parked_overflow_total") == 80 - MAX_PARKED,
                         what="the overflow beyond max_parked_rows to be dead-lettered")
        assert _count(dbs["n2"], "_marmot_parked") == MAX_PARKED
        assert _count(dbs["n2"], "_marmot_dead_letters") == 80 - MAX_PARKED
        # Each overflowing row is a dead letter for marmot_dead_letters_total (the alert's series).
        assert _metric(n2, "marmot_dead_letters_total") == 80 - MAX_PARKED
        await wait_until(lambda: _metric(n2, "marmot_parked_rows") == MAX_PARKED, what="the parked-rows gauge")

        # The node's first look after its start may come after the rows were parked (it looks
        # at every table once); let it pass, then no schema change means no parked row is
        # looked at again over several maintenance rounds (every 2 s).
        await asyncio.sleep(3)
        looked = _metric(n2, "marmot_parked_retry_rows_total")
        assert looked in (0, MAX_PARKED)
        await asyncio.sleep(5)
        assert _metric(n2, "marmot_parked_retry_rows_total") == looked
        # A schema change of another table: the parked rows' table did not change, still nothing.
        execute(dbs["n2"], "CREATE TABLE unrelated (k TEXT PRIMARY KEY)")
        await asyncio.sleep(3)
        assert _metric(n2, "marmot_parked_retry_rows_total") == looked
        # Their table appears: they are retried (once) and applied.
        execute(dbs["n2"], "CREATE TABLE later (k TEXT PRIMARY KEY, v)")
        await wait_until(lambda: _count(dbs["n2"], "later") == MAX_PARKED, what="the parked rows applied")
        assert table_rows(dbs["n2"], "later") == [(f"k{i:03}", i) for i in range(MAX_PARKED)]
        await wait_until(lambda: _metric(n2, "marmot_parked_rows") == 0, what="the park to empty")
        assert _metric(n2, "marmot_parked_retry_rows_total") == looked + MAX_PARKED
    finally:
        for node in nodes:
            node.terminate()
