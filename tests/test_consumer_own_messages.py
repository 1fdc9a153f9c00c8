"""The publishing node skips its own messages without a write transaction, one or many at a time.

Real nats-server, a real ShardConsumer (consumer_gather, handle_group, handle) with a real
BatchApplier on a real SQLite file. The node's publisher records the stream sequence of each
message it published (OwnPublishes); the consumer then meets those messages on the stream and
must move its position past them without applying anything. A delivered group of several used
to go through apply_many (one write transaction per group, ~1.5 µs per row of the writing
node's CPU in bench/replication.py) where a single one only moved the position.
"""

from __future__ import annotations

import asyncio
import sqlite3

import nats
from nats.js.api import StreamConfig

from marmot_appliance.node.status import RuntimeStatus
from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication.applier import BatchApplier
from marmot_appliance.replication.consumer import ShardConsumer
from marmot_appliance.replication.db_thread import DbThread
from marmot_appliance.replication.own_publishes import OwnPublishes
from marmot_appliance.replication.types import POSITIONS_TABLE
from tests.harness import add_stream, make_wal_db
from tests.test_consumer_fuzz import SCHEMA, valid_payload

OWN = 12


def data_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA data_version").fetchone()[0]


async def wait_for_position(consumer: ShardConsumer, task: asyncio.Task, seq: int) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while consumer.position < seq:
        assert not task.done(), f"the consumer ended: {task.exception() if task.done() else ''}"
        assert asyncio.get_running_loop().time() < deadline, f"stalled at {consumer.position} of {seq}"
        await asyncio.sleep(0.02)


async def test_a_group_of_own_messages_moves_the_position_without_writing(nats_server, tmp_path):
    db_path = make_wal_db(tmp_path / "own.db", SCHEMA)
    stream, subject = "own-group", "own-group-subj"
    nc = await nats.connect(nats_server.url, connect_timeout=10)
    apply_db = DbThread("own-apply")
    applier = apply_db.run_sync(BatchApplier, db_path, 1)
    stop = asyncio.Event()
    reader = sqlite3.connect(db_path)
    task: asyncio.Task | None = None
    try:
        js = nc.jetstream(timeout=10)
        await add_stream(js, StreamConfig(name=stream, subjects=[subject]))
        own = OwnPublishes()
        for key in range(1, OWN + 1):  # what the publisher does after each ack
            own.add(stream, (await js.publish(subject, valid_payload(key, "mine", compressed=False))).seq)
        metrics = Metrics()
        consumer = ShardConsumer(js, applier, apply_db, stream, subject, 1, metrics,
                                 RuntimeStatus(node="own", db_path=str(db_path)), 0, own_publishes=own)
        before = data_version(reader)
        task = asyncio.create_task(consumer.run(stop))
        await wait_for_position(consumer, task, OWN)
        # Nothing applied, nothing written: our own rows are in the file already (here: none).
        assert metrics.get("batches_applied") == 0
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (0,)
        assert own.tracked() == 0
        # A message from another node after them is applied, and its transaction stores the
        # position past every skipped own message.
        last = (await js.publish(subject, valid_payload(10**6, "theirs", compressed=False))).seq
        await wait_for_position(consumer, task, last)
        assert data_version(reader) != before
        assert reader.execute("SELECT id, v FROM t").fetchall() == [(10**6, "theirs")]
        stored = reader.execute(f'SELECT seq FROM "{POSITIONS_TABLE}" WHERE stream = ?', (stream,)).fetchone()
        assert stored == (last,)
        assert metrics.get("batches_applied") == 1
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 30)
        reader.close()
        apply_db.run_sync(applier.close)
        apply_db.shutdown()
        await nc.close()
