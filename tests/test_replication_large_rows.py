"""Rows larger than one message replicate (issue 10 case 9): under the rendered 8 MB
max_payload the publisher sizes batches to it; under a stock 1 MB server a 64 MiB row travels
as fragments of one run, joined by receivers and the feed; a row beyond the documented limit is
dead-lettered on its origin and the rows after it flow."""

from __future__ import annotations

import contextlib
import os
import sqlite3

import pytest

from marmot_appliance.feed import changes
from marmot_appliance.replication.types import DEAD_LETTER_TABLE
from tests.harness import NatsCluster
from tests.replication_cluster import InProcessNode, execute, table_rows, wait_until

SCHEMA = "CREATE TABLE files (name TEXT PRIMARY KEY, data BLOB);"


async def test_incompressible_3mb_blob_replicates_and_later_rows_follow(nats_cluster, wal_db):
    dbs = [wal_db(f"n{i}.db", SCHEMA) for i in (1, 2)]
    nodes = [InProcessNode(i, db, nats_cluster.url) for i, db in zip((1, 2), dbs)]
    for node in nodes:
        await node.start()
    try:
        big = os.urandom(3 * 1024 * 1024)  # random bytes: zstd cannot shrink them under 1 MB
        execute(dbs[0], "INSERT INTO files VALUES (?, ?)", ("big.bin", big))
        execute(dbs[0], "INSERT INTO files VALUES (?, ?)", ("small.txt", b"after"))
        expected = [("big.bin", big), ("small.txt", b"after")]
        await wait_until(lambda: table_rows(dbs[1], "files") == expected, what="the 3 MB row and the next on n2")
    finally:
        for node in nodes:
            await node.stop()


@pytest.fixture
def stock_payload_server(tmp_path_factory):
    """One nats-server with the stock 1 MB max_payload (what the seed's command lines run)."""
    cluster = NatsCluster(root=tmp_path_factory.mktemp("nats1mb"))
    try:
        yield cluster.start(1, max_payload="1MB")
    finally:
        cluster.stop()


async def test_64mb_row_replicates_through_a_1mb_server_and_reaches_the_feed(stock_payload_server, wal_db):
    """Issue 10 case 9: one row of 64 MiB (incompressible) travels as fragments of one run and
    is reassembled by the receiving node and by the feed; the rows after it follow."""
    url = stock_payload_server.url
    dbs = [wal_db(f"m{i}.db", SCHEMA) for i in (1, 2)]
    nodes = [InProcessNode(i, db, url, shards=1, replicas=1) for i, db in zip((1, 2), dbs)]
    for node in nodes:
        await node.start()
    try:
        assert nodes[0].runtime.nc.max_payload == 1024 * 1024
        big = os.urandom(64 * 1024 * 1024)
        execute(dbs[0], "INSERT INTO files VALUES (?, ?)", ("big.bin", big))
        execute(dbs[0], "INSERT INTO files VALUES (?, ?)", ("small.txt", b"after"))
        expected = [("big.bin", big), ("small.txt", b"after")]
        await wait_until(lambda: table_rows(dbs[1], "files") == expected, what="the 64 MiB row and the next on n2")

        seen = {}
        async with contextlib.aclosing(changes(url, shards=1, from_="start")) as feed:
            async for record in feed:
                seen[record.pk[0]] = record.values["data"]
                if len(seen) == 2:
                    break
        assert seen == {"big.bin": big, "small.txt": b"after"}
        # Later small writes on the same shard still flow (nothing is stuck behind the big row).
        execute(dbs[0], "INSERT INTO files VALUES (?, ?)", ("later.txt", b"later"))
        await wait_until(lambda: len(table_rows(dbs[1], "files")) == 3, what="a later row on n2")
    finally:
        for node in nodes:
            await node.stop()


async def test_a_row_beyond_the_limit_is_dead_lettered_on_its_origin_and_later_rows_flow(
    stock_payload_server, wal_db, monkeypatch
):
    """The documented limit (codec.MAX_ROW_BODY_BYTES, 68 MiB) lowered to 4 MiB here so the
    test needs no 70 MB row: a 5 MiB row is reported on its origin (dead letter + metric)
    and the rows after it replicate."""
    from marmot_appliance.replication.wire import encode

    monkeypatch.setattr(encode, "MAX_ROW_BODY_BYTES", 4 * 1024 * 1024)  # where the encoder reads it
    url = stock_payload_server.url
    dbs = [wal_db(f"o{i}.db", SCHEMA) for i in (1, 2)]
    nodes = [InProcessNode(i, db, url, shards=1, replicas=1) for i, db in zip((1, 2), dbs)]
    for node in nodes:
        await node.start()
    try:
        execute(dbs[0], "INSERT INTO files VALUES (?, ?)", ("huge.bin", os.urandom(5 * 1024 * 1024)))
        execute(dbs[0], "INSERT INTO files VALUES (?, ?)", ("small.txt", b"after"))
        await wait_until(lambda: table_rows(dbs[1], "files") == [("small.txt", b"after")], what="the row after it on n2")
        conn = sqlite3.connect(dbs[0])
        try:
            reasons = [r[0] for r in conn.execute(f'SELECT reason FROM "{DEAD_LETTER_TABLE}"')]
        finally:
            conn.close()
        assert len(reasons) == 1 and "'files'" in reasons[0] and "cannot be replicated" in reasons[0]
        assert nodes[0].runtime.metrics.get("rows_oversized") == 1
        assert nodes[0].runtime.metrics.get("dead_letters") == 1  # the origin's dead letter counts
        assert nodes[0].runtime.status.pending_rows == 0 or await _no_pending(nodes[0])
    finally:
        for node in nodes:
            await node.stop()


async def _no_pending(node) -> bool:
    await wait_until(lambda: node.runtime.status.pending_rows == 0, what="nothing pending on the origin")
    return True
