"""A row larger than nats-server's 1 MB default payload still replicates: the rendered server
configuration raises max_payload (natsd/config.py), and the publisher sizes batches to it."""

from __future__ import annotations

import os

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
