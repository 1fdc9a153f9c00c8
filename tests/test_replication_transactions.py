"""Rows committed together are applied together on replicas (docs/replication.md, "Transactions stay whole").

With `batch.max_rows` small, one local transaction travels as many messages: the publisher
flags all but the last of a read's messages per shard (Marmot-More) and the receiver applies the
whole run in one SQLite transaction, so a reader on a replica never sees half a transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading

from marmot_appliance.replication.batching import OutgoingBatch, mark_continuations
from tests.replication_cluster import InProcessNode, execute, wait_converged

SCHEMA = "CREATE TABLE ledger (id INTEGER PRIMARY KEY, txn INTEGER, amount INTEGER)"
TRANSACTIONS = (700, 1, 350, 1200)  # rows per transaction; max_rows 10: up to 120 messages each


def _outgoing(shard: int, first_id: int) -> OutgoingBatch:
    return OutgoingBatch(shard, (first_id,), None, b"", f"m{first_id}")


def test_every_message_but_the_last_per_shard_is_flagged():
    batches = [_outgoing(1, 1), _outgoing(1, 2), _outgoing(1, 3), _outgoing(2, 4), _outgoing(3, 5), _outgoing(3, 6)]
    assert [b.more for b in mark_continuations(batches, read_was_cut=False)] == [True, True, False, False, True, False]
    # A read stopped at its row limit may have cut a transaction: every shard's run stays open.
    assert all(b.more for b in mark_continuations(batches, read_was_cut=True))
    assert mark_continuations([], read_was_cut=False) == []


def _snapshots_of_replica(db, stop: threading.Event, seen: set) -> None:
    """Read (count, per-transaction counts) in a loop from another connection, like an app would."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        while not stop.is_set():
            with conn:
                seen.add(tuple(conn.execute("SELECT txn, count(*) FROM ledger GROUP BY txn ORDER BY txn")))
    finally:
        conn.close()


async def test_a_replica_never_shows_part_of_a_transaction(nats_cluster, wal_db):
    db1, db2 = wal_db("t1.db", SCHEMA), wal_db("t2.db", SCHEMA)
    prefixes = {"prefixes": "txn", "batch_max_rows": 10}
    node1 = await InProcessNode(1, db1, nats_cluster.url, shards=1, extra=prefixes).start()
    node2 = await InProcessNode(2, db2, nats_cluster.url, shards=1, extra=prefixes).start()
    stop, seen = threading.Event(), set()
    reader = threading.Thread(target=_snapshots_of_replica, args=(db2, stop, seen), daemon=True)
    reader.start()
    try:
        next_id = 1
        for txn, size in enumerate(TRANSACTIONS, start=1):
            rows = [(next_id + i, txn, i) for i in range(size)]
            next_id += size
            execute(db1, "INSERT INTO ledger VALUES (?, ?, ?)", rows, many=True)
        await wait_converged([db1, db2])
    finally:
        stop.set()
        await asyncio.to_thread(reader.join, 30)
        await node1.stop()
        await node2.stop()
    complete = {txn: size for txn, size in enumerate(TRANSACTIONS, start=1)}
    partial = {view for view in seen if any(count != complete[txn] for txn, count in view)}
    assert not partial, f"a reader on the replica saw partial transactions: {sorted(partial)[:3]}"
    assert len(seen) > 1  # the reader did watch the rows arrive


async def test_a_run_past_the_size_cap_is_applied_in_pieces_and_still_converges(nats_cluster, wal_db, monkeypatch):
    """The cap bounds a receiver's memory; past it a run is split (counted), nothing is lost."""
    from marmot_appliance.replication import consumer_gather

    monkeypatch.setattr(consumer_gather, "MAX_RUN_BYTES", 2_000)
    db1, db2 = wal_db("c1.db", SCHEMA), wal_db("c2.db", SCHEMA)
    prefixes = {"prefixes": "txncap", "batch_max_rows": 10}
    node1 = await InProcessNode(1, db1, nats_cluster.url, shards=1, extra=prefixes).start()
    node2 = await InProcessNode(2, db2, nats_cluster.url, shards=1, extra=prefixes).start()
    try:
        execute(db1, "INSERT INTO ledger VALUES (?, ?, ?)", [(i, 1, i) for i in range(1, 501)], many=True)
        await wait_converged([db1, db2])
        assert node2.runtime.metrics.get("runs_split") > 0
    finally:
        await node1.stop()
        await node2.stop()
