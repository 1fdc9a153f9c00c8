"""UNIQUE constraints besides the primary key: rows that collide on them converge too.

`INSERT OR REPLACE` on one node silently deletes the row it collides with (SQLite fires no
delete trigger for it), and two nodes can insert the same unique value under different keys at
the same time. Either way replicas used to dead-letter the incoming row and keep their own:
the copies diverged. The applier now settles such collisions by version, like any conflict.
"""

from __future__ import annotations

import sqlite3

from tests.replication_cluster import InProcessNode, execute, table_rows, wait_converged, wait_until

SCHEMA = "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE COLLATE NOCASE, name TEXT)"


def _dead_letters(db) -> list:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT reason FROM _marmot_dead_letters").fetchall()
    finally:
        conn.close()


async def _nodes(nats_cluster, dbs, prefix):
    return [await InProcessNode(i + 1, db, nats_cluster.url, shards=1, extra={"prefixes": prefix}).start()
            for i, db in enumerate(dbs)]


async def test_insert_or_replace_that_displaces_another_row_converges(nats_cluster, wal_db):
    dbs = [wal_db(f"r{i}.db", SCHEMA) for i in (1, 2, 3)]
    nodes = await _nodes(nats_cluster, dbs, "uqr")
    try:
        execute(dbs[0], "INSERT INTO users VALUES (1, 'a@x', 'first')")
        await wait_until(lambda: all(table_rows(db, "users") == [(1, "a@x", "first")] for db in dbs[1:]),
                         what="the first row everywhere")
        execute(dbs[0], "INSERT OR REPLACE INTO users VALUES (2, 'A@X', 'second')")  # NOCASE: collides
        await wait_converged(dbs)
        assert table_rows(dbs[1], "users") == [(2, "A@X", "second")]
        # The displaced row stays deleted when an older change of it arrives later.
        assert all(_dead_letters(db) == [] for db in dbs)
    finally:
        for node in nodes:
            await node.stop()


async def test_same_unique_value_written_on_two_nodes_keeps_the_newest_everywhere(nats_cluster, wal_db):
    import asyncio

    dbs = [wal_db(f"c{i}.db", SCHEMA) for i in (1, 2, 3)]
    nodes = await _nodes(nats_cluster, dbs, "uqc")
    try:
        await nodes[1].stop()  # node 2 is away: it cannot see node 1's row before writing its own
        execute(dbs[0], "INSERT INTO users VALUES (10, 'same@x', 'older, node 1')")
        await asyncio.sleep(0.05)  # a later millisecond: node 2's version is the newer one
        execute(dbs[1], "INSERT INTO users VALUES (20, 'same@x', 'newer, node 2')")  # captured offline
        await nodes[1].start()
        await wait_converged(dbs)
        assert table_rows(dbs[2], "users") == [(20, "same@x", "newer, node 2")]
        assert all(_dead_letters(db) == [] for db in dbs)
        # The loser's key is tombstoned below a later write: a new change to it replicates.
        execute(dbs[2], "INSERT INTO users VALUES (10, 'other@x', 'revived on node 3')")
        await wait_converged(dbs)
        assert table_rows(dbs[0], "users") == [(10, "other@x", "revived on node 3"), (20, "same@x", "newer, node 2")]
    finally:
        for node in nodes:
            await node.stop()
