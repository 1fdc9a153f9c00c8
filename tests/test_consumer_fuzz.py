"""Fuzz the consumer's real path: no payload stalls a shard (issue 10 case 16).

Truncated, bit-flipped and random payloads (and garbage run headers) go through a real
nats-server into a real ShardConsumer (the node's class: consumer_gather.gather, handle_group, handle,
dead letters) with a real BatchApplier on a real SQLite file. After them comes one valid
batch: it must be applied, the position must reach the last sequence, and every message must
have been either applied or dead-lettered. Each hypothesis example uses a fresh stream.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3

import nats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.js.api import StreamConfig

from marmot_appliance.node.status import RuntimeStatus
from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication import codec
from marmot_appliance.replication.applier import BatchApplier
from marmot_appliance.replication.consumer import ShardConsumer
from marmot_appliance.replication.db_thread import DbThread
from marmot_appliance.replication.types import DEAD_LETTER_TABLE, ChangeBatch, RowChange
from marmot_appliance.spec.model import CompressionSettings
from tests.harness import add_stream, make_wal_db

SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, b BLOB)"
COMPRESSIONS = (CompressionSettings(level=0, min_bytes=0), CompressionSettings(level=3, min_bytes=0))
_streams = itertools.count(1)


def valid_payload(key: int, text: str, compressed: bool) -> bytes:
    row = RowChange("t", "upsert", (key,), ("id", "v", "b"), (key, text, text.encode()), 1000 + key, 9)
    batch = ChangeBatch(origin=9, rows=(row,), primary_keys={"t": ("id",)})
    return codec.encode_batch(batch, COMPRESSIONS[compressed])


@st.composite
def corrupt_messages(draw):
    """(payload, headers): a valid batch truncated or bit-flipped, or random bytes."""
    kind = draw(st.sampled_from(["truncated", "flipped", "random", "random-zstd"]))
    if kind == "random":
        payload = draw(st.binary(max_size=200))
    elif kind == "random-zstd":
        payload = b"\x01\x01" + draw(st.binary(max_size=200))
    else:
        payload = bytearray(valid_payload(draw(st.integers(1, 10**6)), draw(st.text(max_size=300)), draw(st.booleans())))
        if kind == "truncated":
            payload = payload[: draw(st.integers(0, len(payload) - 1))]
        else:
            for position in draw(st.lists(st.integers(0, len(payload) * 8 - 1), min_size=1, max_size=6)):
                payload[position // 8] ^= 1 << (position % 8)
        payload = bytes(payload)
    headers = draw(st.sampled_from([None, {"Marmot-More": "1", "Marmot-Origin": "9"}, {"Marmot-Origin": "\x00junk"}]))
    return payload, headers


async def run_scenario(nats_url: str, db_path, messages: list[tuple[bytes, dict | None]]) -> None:
    stream = f"fuzz-{next(_streams)}"
    subject = f"{stream}-subj"
    nc = await nats.connect(nats_url, connect_timeout=10)
    apply_db = DbThread("fuzz-apply")
    applier = apply_db.run_sync(BatchApplier, db_path, 1)
    stop = asyncio.Event()
    try:
        js = nc.jetstream(timeout=10)
        await add_stream(js, StreamConfig(name=stream, subjects=[subject]))
        key = 10**7 + next(_streams)
        sentinel = valid_payload(key, "after the corrupt ones", compressed=True)
        for payload, headers in messages:
            await js.publish(subject, payload, headers=headers)
        last = (await js.publish(subject, sentinel)).seq
        status = RuntimeStatus(node="fuzz", db_path=str(db_path))
        consumer = ShardConsumer(js, applier, apply_db, stream, subject, 1, Metrics(), status, 0)
        task = asyncio.create_task(consumer.run(stop))
        deadline = asyncio.get_running_loop().time() + 60
        while consumer.position < last:
            assert not task.done(), f"the consumer ended: {task.exception() if task.done() else ''}"
            assert asyncio.get_running_loop().time() < deadline, (
                f"stream stalled at {consumer.position} of {last}; messages: {messages!r:.2000}"
            )
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 30)
        conn = sqlite3.connect(db_path)
        try:
            assert conn.execute("SELECT v FROM t WHERE id = ?", (key,)).fetchone() == ("after the corrupt ones",)
            dead = conn.execute(f'SELECT count(*) FROM "{DEAD_LETTER_TABLE}" WHERE stream = ?', (stream,)).fetchone()[0]
        finally:
            conn.close()
        applied = consumer.metrics.get("batches_applied")
        # Each message: applied (a flip may leave a valid batch) or dead-lettered, never skipped.
        assert applied + dead == len(messages) + 1, (applied, dead, len(messages))
    finally:
        stop.set()
        apply_db.run_sync(applier.close)
        apply_db.shutdown()
        await nc.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(messages=st.lists(corrupt_messages(), min_size=1, max_size=8))
def test_no_payload_stalls_the_shard(nats_server, tmp_path, messages):
    db_path = tmp_path / "fuzz.db"
    if not db_path.exists():
        make_wal_db(db_path, SCHEMA)
    asyncio.run(run_scenario(nats_server.url, db_path, messages))


def test_known_killers_do_not_stall_the_shard(nats_server, tmp_path):
    """The payloads that stalled shards before (case 16), in a run and alone."""
    db_path = make_wal_db(tmp_path / "known.db", SCHEMA)
    run = {"Marmot-More": "1", "Marmot-Origin": "9"}
    asyncio.run(run_scenario(nats_server.url, db_path, [
        (b"\x01\x01\x09garbage", None),
        (b"\x01\x01\x09garbage", run),
        (b"\x01\x01\x28\xb5\x2f\xfd\xff", run),
        (b"\x01\x01", None),
    ]))


def test_fragments_out_of_order_are_dead_lettered_and_a_whole_row_applies(nats_server, tmp_path):
    """A large row's pieces through the real consumer: a stray middle piece is dead-lettered,
    a set restarted at its first piece is joined and applied, and the shard flows on."""
    import os

    db_path = make_wal_db(tmp_path / "frag.db", SCHEMA)
    big = os.urandom(5000)
    row = RowChange("t", "upsert", (77,), ("id", "v", "b"), (77, "large", big), 5000, 9)
    pieces = codec.fragment_payloads(codec.body_map(ChangeBatch(origin=9, rows=(row,), primary_keys={"t": ("id",)})), 1024)
    assert len(pieces) >= 3
    run = {"Marmot-More": "1", "Marmot-Origin": "9"}
    messages = [(pieces[1], run)] + [(p, run) for p in pieces[:2]] + [(p, run) for p in pieces]
    messages[-1] = (pieces[-1], {"Marmot-Origin": "9"})

    async def scenario():
        stream = f"frag-{next(_streams)}"
        subject = f"{stream}-subj"
        nc = await nats.connect(nats_server.url, connect_timeout=10)
        apply_db = DbThread("frag-apply")
        applier = apply_db.run_sync(BatchApplier, db_path, 1)
        stop = asyncio.Event()
        try:
            js = nc.jetstream(timeout=10)
            await add_stream(js, StreamConfig(name=stream, subjects=[subject]))
            for payload, headers in messages:
                await js.publish(subject, payload, headers=headers)
            last = (await js.publish(subject, valid_payload(78, "after", True))).seq
            consumer = ShardConsumer(js, applier, apply_db, stream, subject, 1, Metrics(),
                                     RuntimeStatus(node="frag", db_path=str(db_path)), 0)
            task = asyncio.create_task(consumer.run(stop))
            deadline = asyncio.get_running_loop().time() + 60
            while consumer.position < last:
                assert not task.done() and asyncio.get_running_loop().time() < deadline, consumer.position
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 30)
            return consumer
        finally:
            stop.set()
            apply_db.run_sync(applier.close)
            apply_db.shutdown()
            await nc.close()

    consumer = asyncio.run(scenario())
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT v, b FROM t WHERE id = 77").fetchone() == ("large", big)
        assert conn.execute("SELECT v FROM t WHERE id = 78").fetchone() == ("after",)
        assert conn.execute(f'SELECT count(*) FROM "{DEAD_LETTER_TABLE}"').fetchone()[0] == 1  # the stray piece
        assert conn.execute('SELECT count(*) FROM "_marmot_fragments"').fetchone()[0] == 0
    finally:
        conn.close()
    assert consumer.metrics.get("dead_letters") == 1
