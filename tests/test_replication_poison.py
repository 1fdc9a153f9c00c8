"""Corrupt messages on a shard stream never stall it (issue 10 case 16, issue 11 item 4).

Every decoding error, on every path the consumer takes (run sizes, headers, the body), dead-
letters the message and the shard goes on. Real nats-server, real nodes, real SQLite files.
"""

from __future__ import annotations

import sqlite3

import nats
import zstandard

from marmot_appliance.replication.streams import wait_for_stream_leader
from marmot_appliance.replication.types import DEAD_LETTER_TABLE
from tests.replication_cluster import InProcessNode, execute, table_rows, wait_until

SCHEMA = "CREATE TABLE doc (id TEXT PRIMARY KEY, body TEXT, rev INTEGER)"


def dead_letter_reasons(db) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute(f'SELECT reason FROM "{DEAD_LETTER_TABLE}" ORDER BY seq')]
    finally:
        conn.close()


async def test_garbage_zstd_frame_is_dead_lettered_and_the_shard_keeps_flowing(nats_cluster, wal_db):
    """Case 16: the envelope says zstd, the frame is garbage; run sizing used to raise forever."""
    dbs = [wal_db(f"p{i}.db", SCHEMA) for i in (1, 2)]
    nodes = [InProcessNode(i, db, nats_cluster.url, shards=1) for i, db in zip((1, 2), dbs)]
    for node in nodes:
        await node.start()
    try:
        nc = await nats.connect(nats_cluster.urls, connect_timeout=10)
        try:
            js = nc.jetstream(timeout=10)
            assert await wait_for_stream_leader(js, "marmot-changes-1")
            await js.publish("marmot-change-log-1.7", b"\x01\x01\x09garbage")
            # The same garbage inside a run (Marmot-More): sizing the run must not raise either.
            await js.publish("marmot-change-log-1.7", b"\x01\x01\x09garbage", headers={"Marmot-More": "1", "Marmot-Origin": "7"})
            await js.publish("marmot-change-log-1.7", b"\x01\x01\x28\xb5\x2f\xfd\xff", headers={"Marmot-Origin": "7"})
        finally:
            await nc.close()
        execute(dbs[0], "INSERT INTO doc VALUES ('after', 'still flows', 1)")
        await wait_until(lambda: all(table_rows(db, "doc") == [("after", "still flows", 1)] for db in dbs),
                         what="the row after the corrupt messages on both nodes")
        await wait_until(lambda: all(len(dead_letter_reasons(db)) == 3 for db in dbs), what="3 dead letters on each node")
        assert all("zstd" in reason for reason in dead_letter_reasons(dbs[1]))
        assert all(n.runtime.metrics.get("dead_letters") == 3 for n in nodes)
    finally:
        for node in nodes:
            await node.stop()


async def test_compressed_item_bomb_is_dead_lettered_by_every_node(nats_cluster, wal_db):
    """Issue 11 item 4 on real nodes: a few-KB message that decompresses to 64 MB of nulls is
    refused (bounded before objects are built) and dead-lettered; the shard keeps flowing."""
    from tests.test_codec import _item_bomb

    bomb = b"\x01\x01" + zstandard.ZstdCompressor(level=19).compress(_item_bomb(b"\xf6"))
    dbs = [wal_db(f"b{i}.db", SCHEMA) for i in (1, 2)]
    nodes = [InProcessNode(i, db, nats_cluster.url, shards=1) for i, db in zip((1, 2), dbs)]
    for node in nodes:
        await node.start()
    try:
        nc = await nats.connect(nats_cluster.urls, connect_timeout=10)
        try:
            js = nc.jetstream(timeout=10)
            assert await wait_for_stream_leader(js, "marmot-changes-1")
            await js.publish("marmot-change-log-1.7", bomb)
        finally:
            await nc.close()
        execute(dbs[0], "INSERT INTO doc VALUES ('after', 'still flows', 1)")
        await wait_until(lambda: all(table_rows(db, "doc") == [("after", "still flows", 1)] for db in dbs),
                         what="the row after the bomb on both nodes")
        await wait_until(lambda: all(len(dead_letter_reasons(db)) == 1 for db in dbs), what="1 dead letter per node")
        assert "items" in dead_letter_reasons(dbs[1])[0]
    finally:
        for node in nodes:
            await node.stop()
