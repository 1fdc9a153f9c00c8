"""Publisher against a real nats-server and a real captured database."""

from __future__ import annotations

import asyncio
import sqlite3

import nats
import pytest

from marmot_appliance.node.status import RuntimeStatus
from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication.batching import BatchBuilder
from marmot_appliance.replication.capture import ChangeCapture
from marmot_appliance.replication.codec import MSG_ID_HEADER, decode_batch
from marmot_appliance.replication.db_thread import DbThread
from marmot_appliance.replication.own_publishes import OwnPublishes
from marmot_appliance.replication.publisher import Publisher
from marmot_appliance.replication.sharding import shard_for
from marmot_appliance.replication.streams import ensure_streams, stream_config
from marmot_appliance.spec.model import BatchLimits, ReplicationSettings
from tests.harness import add_stream, settled

SCHEMA = "CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER, body BLOB)"


class _NoWakeup:
    async def wait(self, timeout_s=None):
        await asyncio.sleep(min(timeout_s or 0.01, 0.01))
        return False

    def notify(self):
        pass


def _insert(db, rows):
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany("INSERT INTO items VALUES (?, ?, ?)", rows)
    conn.close()


async def _stream_messages(js, stream: str) -> list:
    info = await settled(lambda: js.stream_info(stream))
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        out.append(await js.get_msg(stream, seq))
    return out


@pytest.fixture
async def js_conn(nats_server):
    nc = await nats.connect(nats_server.urls, connect_timeout=10)
    try:
        yield nc, nc.jetstream(timeout=10)
    finally:
        await nc.close()


async def test_rows_published_per_shard_then_marked(wal_db, js_conn):
    nc, js = js_conn
    replication = ReplicationSettings(shards=4, batch=BatchLimits(max_rows=7))
    await ensure_streams(js, replication, 1)
    db = wal_db("p.db", SCHEMA)
    db_thread = DbThread("cap")
    capture = await db_thread.run(ChangeCapture, str(db), 1, None)
    await db_thread.run(capture.install)
    rows = [(f"k{i}", i, bytes([i % 256]) * i) for i in range(100)]
    _insert(db, rows)
    own = OwnPublishes()
    publisher = Publisher(js, capture, db_thread, 1, replication, nc.max_payload, _NoWakeup(), Metrics(),
                          RuntimeStatus("n1", str(db)), own_publishes=own)
    try:
        while await publisher.publish_round():
            pass
        assert await db_thread.run(capture.pending_count) == 0
        seen = {}
        for shard in range(1, 5):
            for msg in await _stream_messages(js, replication.stream_name(shard)):
                batch = decode_batch(msg.data)
                assert len(batch.rows) <= 7
                assert msg.headers[MSG_ID_HEADER].startswith("1-")
                assert own.take(replication.stream_name(shard), msg.seq)
                for row in batch.rows:
                    assert shard_for(row.table, row.pk, 4) == shard
                    seen[row.pk[0]] = dict(zip(row.columns, row.values))
        assert seen == {k: {"id": k, "n": n, "body": b} for k, n, b in rows}
    finally:
        await db_thread.run(capture.close)
        db_thread.shutdown()


async def test_unacknowledged_rows_stay_pending_and_go_out_later(wal_db, js_conn):
    """No stream yet: no ack, nothing marked. Once the stream exists the same rows go out."""
    nc, js = js_conn
    replication = ReplicationSettings(shards=1, stream_prefix="late", subject_prefix="late-subj")
    db = wal_db("q.db", SCHEMA)
    db_thread = DbThread("cap")
    capture = await db_thread.run(ChangeCapture, str(db), 2, None)
    await db_thread.run(capture.install)
    _insert(db, [("a", 1, None), ("b", 2, None)])
    publisher = Publisher(js, capture, db_thread, 2, replication, nc.max_payload, _NoWakeup(), Metrics(),
                          RuntimeStatus("n2", str(db)))
    try:
        with pytest.raises(Exception):
            await publisher.publish_round()
        assert await db_thread.run(capture.pending_count) == 2
        await add_stream(js, stream_config(replication, 1, 1))
        assert await publisher.publish_round() is False
        assert await db_thread.run(capture.pending_count) == 0
        msgs = await _stream_messages(js, "late-1")
        assert [r.pk for m in msgs for r in decode_batch(m.data).rows] == [("a",), ("b",)]
    finally:
        await db_thread.run(capture.close)
        db_thread.shutdown()


async def test_retry_of_same_rows_is_deduplicated(wal_db, js_conn):
    """A crash between ack and mark re-sends the same batch: same Nats-Msg-Id, one message."""
    nc, js = js_conn
    replication = ReplicationSettings(shards=1)
    await ensure_streams(js, replication, 1)
    db = wal_db("d.db", SCHEMA)
    capture = ChangeCapture(str(db), 3)
    capture.install()
    _insert(db, [("x", 1, b"\x00")])
    try:
        builder = BatchBuilder(3, replication, nc.max_payload)
        first = builder.build_rows(capture.read_pending_rows(100))
        again = builder.build_rows(capture.read_pending_rows(100))  # "after the crash": nothing was marked
        assert [b.msg_id for b in first] == [b.msg_id for b in again]
        for outgoing in first + again:
            ack = await js.publish(f"{replication.subject(1)}.3", outgoing.payload, headers={MSG_ID_HEADER: outgoing.msg_id})
        assert ack.duplicate is True
        assert (await settled(lambda: js.stream_info(replication.stream_name(1)))).state.messages == 1
    finally:
        capture.close()


def test_oversized_batches_are_split_by_encoded_size(wal_db):
    db = wal_db("s.db", SCHEMA)
    capture = ChangeCapture(str(db), 4)
    capture.install()
    import os

    _insert(db, [(f"r{i}", i, os.urandom(3000)) for i in range(40)])  # incompressible
    try:
        builder = BatchBuilder(4, ReplicationSettings(), max_payload=4096 + 20_000)
        batches = builder.build_rows(capture.read_pending_rows(1000))
        assert len(batches) > 1
        assert all(len(b.payload) <= 20_000 for b in batches)
        assert sorted(i for b in batches for i in b.log_ids) == sorted(p.log_id for p in capture.read_pending(1000))
    finally:
        capture.close()


async def test_ack_wait_counts_from_the_send_not_from_the_collection(wal_db, js_conn):
    """A lost stream leader must cost one ack timeout, not one per round in flight.

    Rounds are collected one after another; each round's wait ends at its own send time +
    ACK_TIMEOUT_S. A round collected after its deadline, whose acks never came (here: a real
    subscriber on the subject that never replies), is failed at once and its futures released.
    """
    import time

    import nats.errors

    from marmot_appliance.replication.batching import OutgoingBatch

    nc, js = js_conn
    replication = ReplicationSettings(shards=1, stream_prefix="silent", subject_prefix="silent-subj")
    black_hole = await nc.subscribe(f"{replication.subject(1)}.*")  # takes the message, never acks
    db = wal_db("silent.db", SCHEMA)
    db_thread = DbThread("cap")
    capture = await db_thread.run(ChangeCapture, str(db), 3, None)
    publisher = Publisher(js, capture, db_thread, 3, replication, nc.max_payload, _NoWakeup(), Metrics(),
                          RuntimeStatus("n3", str(db)))
    try:
        outgoing = OutgoingBatch(1, (1,), None, b"\x01\x00\xa0", "3-1-1-silent")
        sent, failure = await publisher._send_batches([outgoing])
        assert failure is None and len(sent) == 1
        sent_deadline = time.monotonic() - 0.001  # the round was sent ACK_TIMEOUT_S ago
        acked, failure = await asyncio.wait_for(publisher._collect_acks(sent, None, sent_deadline), 2.0)
        assert acked == [] and isinstance(failure, nats.errors.TimeoutError)
        assert sent[0][1].cancelled()  # released: the publish_async window does not fill up
        await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
        assert js.publish_async_pending() == 0
        # A round after a failed one is abandoned without waiting at all.
        later, _ = await publisher._send_batches([outgoing])
        publisher._abandon(later)
        await asyncio.sleep(0)
        assert later[0][1].cancelled() and js.publish_async_pending() == 0
    finally:
        await black_hole.unsubscribe()
        await db_thread.run(capture.close)
        db_thread.shutdown()
