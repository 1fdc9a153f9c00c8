"""The change feed API against a real 3-server JetStream cluster and real encoded batches."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
from datetime import timedelta

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import StorageType, StreamConfig

from marmot_appliance.feed import ChangeRecord, FeedError, changes, json_value, parse_start
from marmot_appliance.natsd.permissions import shard_stream_subjects
from marmot_appliance.replication.codec import ORIGIN_HEADER, encode_batch
from marmot_appliance.replication.streams import wait_for_stream_leader
from marmot_appliance.replication.types import ChangeBatch, RowChange
from marmot_appliance.spec.model import CompressionSettings, ReplicationSettings
from tests.harness import settled

STREAM_PREFIX = "marmot-changes"
SUBJECT_PREFIX = "marmot-change-log"
WAIT_S = 60.0  # generous: a shared, noisy machine; never a speed assertion

NAN_WITH_PAYLOAD = struct.unpack(">d", bytes.fromhex("7ff8000000000abc"))[0]
# (column, value) pairs covering every SQLite storage class and its awkward corners
STORAGE_CLASS_VALUES = [
    ("i_max", 2**63 - 1),
    ("i_min", -(2**63)),
    ("r_tenth", 0.1),
    ("r_negzero", -0.0),
    ("r_inf", math.inf),
    ("r_nan", NAN_WITH_PAYLOAD),
    ("t_big", "\U0001f600 non-BMP, NUL \x00 inside, " + "x" * 1_000_000),
    ("b_blob", b"\x00\xffbinary\x00"),
    ("n_null", None),
]


def bits(value):
    return ("float", struct.pack(">d", value)) if isinstance(value, float) else (type(value), value)


async def create_shard_streams(
    js, shards: int, stream_prefix: str = STREAM_PREFIX, subject_prefix: str = SUBJECT_PREFIX, replicas: int = 3
) -> None:
    names = ReplicationSettings(stream_prefix=stream_prefix, subject_prefix=subject_prefix)
    from marmot_appliance.replication.streams import retry_while_settling

    for shard in range(1, shards + 1):
        config = StreamConfig(
            name=names.stream_name(shard),
            subjects=shard_stream_subjects(names, shard),
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_msg_size=4 * 1024 * 1024,
        )
        # Right after the cluster starts the request can time out (seen in CI); adding the
        # same config again is idempotent.
        await retry_while_settling(f"creating {config.name}", lambda config=config: js.add_stream(config), 60.0)
        assert await wait_for_stream_leader(js, names.stream_name(shard), timeout_s=60)


async def publish(js, batch: ChangeBatch, shard: int = 1, subject_prefix: str = SUBJECT_PREFIX) -> int:
    payload = encode_batch(batch, CompressionSettings())
    for attempt in range(50):
        try:
            ack = await js.publish(
                f"{subject_prefix}-{shard}.{batch.origin}", payload, headers={ORIGIN_HEADER: str(batch.origin)}, timeout=30
            )
            return ack.seq
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            # Right after a stream is created, its subject interest may not have reached the
            # server this client is connected to yet; nothing was stored, so retrying is safe.
            await asyncio.sleep(0.1)
    raise AssertionError(f"{subject_prefix}-{shard}: no stream answered in 50 attempts")


def batch_of(origin: int, *rows: RowChange) -> ChangeBatch:
    tables = {row.table for row in rows}
    return ChangeBatch(origin=origin, rows=rows, primary_keys={t: ("id",) for t in tables})


def up(table: str, key, version: int, origin: int = 1, **values) -> RowChange:
    columns = ("id", *values)
    return RowChange(table, "upsert", (key,), columns, (key, *values.values()), version, origin)


def delete(table: str, key, version: int, origin: int = 1) -> RowChange:
    return RowChange(table, "delete", (key,), ("id",), (key,), version, origin)


async def collect(feed, count: int, timeout: float = WAIT_S) -> list[ChangeRecord]:
    records: list[ChangeRecord] = []

    async def gather():
        async for record in feed:
            records.append(record)
            if len(records) >= count:
                return

    try:
        await asyncio.wait_for(gather(), timeout)
    finally:
        await feed.aclose()
    return records


async def wait_for_consumers(js, stream: str, count: int = 1, process=None) -> None:
    """The feed's consumer exists: what is published from now on is 'new' for it.

    `process` (a Popen running the feed) ends the wait early, with its stderr, if it exits."""
    for _ in range(900):
        if (await settled(lambda: js.stream_info(stream))).state.consumer_count >= count:
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the feed exited ({process.returncode}) before a consumer appeared on "
                                 f"{stream}: {process.stderr.read()}")
        await asyncio.sleep(0.1)
    raise AssertionError(f"no consumer appeared on {stream}")


@pytest.fixture
async def js_conn(nats_cluster):
    nc = await nats.connect(nats_cluster.urls, connect_timeout=10)
    try:
        yield nc, nc.jetstream(timeout=30)
    finally:
        await nc.close()


async def test_start_replays_history_in_stream_order_with_exact_values(nats_cluster, js_conn):
    _, js = js_conn
    await create_shard_streams(js, 1)
    wide = up("kinds", 1, 1000, **dict(STORAGE_CLASS_VALUES))
    seqs = [
        await publish(js, batch_of(1, up("t", 1, 10, v="a"), up("t", 2, 11, v="b"))),
        await publish(js, batch_of(2, up("t", 1, 12, origin=2, v="a2"), delete("t", 2, 13, origin=2))),
        await publish(js, batch_of(1, wide)),
    ]
    records = await collect(changes(nats_cluster.url, STREAM_PREFIX, 1, from_="start"), 5)

    assert [(r.seq, r.table, r.op, r.pk, r.version, r.origin) for r in records] == [
        (seqs[0], "t", "upsert", (1,), 10, 1),
        (seqs[0], "t", "upsert", (2,), 11, 1),
        (seqs[1], "t", "upsert", (1,), 12, 2),
        (seqs[1], "t", "delete", (2,), 13, 2),
        (seqs[2], "kinds", "upsert", (1,), 1000, 1),
    ]
    assert records[2].values == {"id": 1, "v": "a2"}
    assert records[3].values == {"id": 2}  # a tombstone carries the key only
    assert all(r.stream == "marmot-changes-1" for r in records)
    assert records[0].time <= records[4].time
    kinds = records[4].values
    assert list(kinds) == ["id", *(column for column, _ in STORAGE_CLASS_VALUES)]
    for column, value in STORAGE_CLASS_VALUES:
        assert bits(kinds[column]) == bits(value), column


async def test_from_now_sees_only_new_changes(nats_cluster, js_conn):
    _, js = js_conn
    await create_shard_streams(js, 1)
    await publish(js, batch_of(1, up("t", 1, 10, v="old")))
    feed = changes(nats_cluster.url, STREAM_PREFIX, 1)  # from now
    reader = asyncio.create_task(collect(feed, 1))
    await wait_for_consumers(js, "marmot-changes-1")
    new_seq = await publish(js, batch_of(1, up("t", 2, 20, v="new")))
    (record,) = await reader
    assert (record.seq, record.values) == (new_seq, {"id": 2, "v": "new"})


async def test_from_sequence_and_from_time(nats_cluster, js_conn):
    _, js = js_conn
    await create_shard_streams(js, 1)
    for key in range(1, 5):
        await publish(js, batch_of(1, up("t", key, key, v=str(key))))
        await asyncio.sleep(0.05)  # distinct storage timestamps, so a time picks one message

    from_seq = await collect(changes(nats_cluster.url, STREAM_PREFIX, 1, from_="3"), 2)
    assert [r.seq for r in from_seq] == [3, 4]

    everything = await collect(changes(nats_cluster.url, STREAM_PREFIX, 1, from_="start"), 4)
    # nats-py reports the stored time rounded to microseconds (possibly up): start a millisecond
    # earlier; the messages are 50 ms apart, so this still picks the third one.
    third_time = everything[2].time - timedelta(milliseconds=1)
    iso = third_time.isoformat()
    from_time = await collect(changes(nats_cluster.url, STREAM_PREFIX, 1, from_=iso), 2)
    assert [r.seq for r in from_time] == [3, 4]
    # a time before everything replays everything
    earlier = (everything[0].time - timedelta(hours=1)).isoformat()
    assert [r.seq for r in await collect(changes(nats_cluster.url, STREAM_PREFIX, 1, from_=earlier), 4)] == [
        1,
        2,
        3,
        4,
    ]


async def test_table_and_op_filters(nats_cluster, js_conn):
    _, js = js_conn
    await create_shard_streams(js, 1)
    await publish(
        js,
        batch_of(
            1,
            up("keep", 1, 1, v="a"),
            up("skip", 1, 2, v="b"),
            delete("keep", 1, 3),
            up("other", 5, 4, v="c"),
            up("keep", 2, 5, v="d"),
        ),
    )
    kept = await collect(changes(nats_cluster.url, STREAM_PREFIX, 1, from_="start", tables=["keep", "other"]), 4)
    assert [(r.table, r.op, r.pk) for r in kept] == [
        ("keep", "upsert", (1,)),
        ("keep", "delete", (1,)),
        ("other", "upsert", (5,)),
        ("keep", "upsert", (2,)),
    ]
    # a marker message after the filtered ones proves nothing else was left out
    await publish(js, batch_of(1, delete("zzz", 9, 6)))
    deletes = await collect(changes(nats_cluster.url, STREAM_PREFIX, 1, from_="start", ops=["delete"]), 2)
    assert [(r.table, r.pk) for r in deletes] == [("keep", (1,)), ("zzz", (9,))]
    both = await collect(
        changes(nats_cluster.url, STREAM_PREFIX, 1, from_="start", tables=["keep"], ops=["upsert"]), 2
    )
    assert [r.pk for r in both] == [(1,), (2,)]


async def test_every_shard_stream_is_followed_and_discovered(nats_cluster, js_conn):
    _, js = js_conn
    await create_shard_streams(js, 3)
    for shard in (1, 2, 3):
        for n in range(3):
            await publish(js, batch_of(1, up("t", shard * 10 + n, n, v=f"s{shard}")), shard=shard)
    for shards in (3, None):  # explicit count, then discovery
        records = await collect(changes(nats_cluster.url, STREAM_PREFIX, shards, from_="start"), 9)
        by_stream: dict[str, list[int]] = {}
        for record in records:
            by_stream.setdefault(record.stream, []).append(record.seq)
        assert by_stream == {f"marmot-changes-{s}": [1, 2, 3] for s in (1, 2, 3)}  # stream order kept


async def test_undecodable_message_is_reported_and_skipped(nats_cluster, js_conn):
    _, js = js_conn
    await create_shard_streams(js, 1)
    await publish(js, batch_of(1, up("t", 1, 1, v="before")))
    await js.publish(f"{SUBJECT_PREFIX}-1.1", b"\x01\x00not cbor at all")
    await publish(js, batch_of(1, up("t", 2, 2, v="after")))
    skipped = []
    records = await collect(
        changes(
            nats_cluster.url,
            STREAM_PREFIX,
            1,
            from_="start",
            on_undecodable=lambda stream, seq, error: skipped.append((stream, seq, str(error))),
        ),
        2,
    )
    assert [(r.seq, r.values["v"]) for r in records] == [(1, "before"), (3, "after")]
    assert [(stream, seq) for stream, seq, _ in skipped] == [("marmot-changes-1", 2)]
    assert "CBOR" in skipped[0][2]


async def test_a_passed_connection_stays_open(nats_cluster, js_conn):
    nc, js = js_conn
    await create_shard_streams(js, 1)
    await publish(js, batch_of(1, up("t", 1, 1, v="x")))
    (record,) = await collect(changes(nc, STREAM_PREFIX, 1, from_="start"), 1)
    assert record.values == {"id": 1, "v": "x"}
    assert nc.is_connected
    await nc.flush(timeout=10)


async def test_custom_prefixes_and_subject_check(nats_cluster, js_conn):
    _, js = js_conn
    await create_shard_streams(js, 1, stream_prefix="shop-changes", subject_prefix="shop-log")
    await publish(js, batch_of(1, up("t", 1, 1, v="x")), subject_prefix="shop-log")
    records = await collect(
        changes(nats_cluster.url, "shop-changes", 1, from_="start", subject_prefix="shop-log"), 1
    )
    assert records[0].stream == "shop-changes-1"
    with pytest.raises(FeedError, match="subject-prefix"):
        await collect(changes(nats_cluster.url, "shop-changes", 1, from_="start", subject_prefix="nope"), 1)


async def test_missing_streams_are_a_clear_error(nats_cluster, js_conn):
    _, js = js_conn
    await create_shard_streams(js, 1)
    with pytest.raises(FeedError, match="marmot-changes-2 does not exist"):
        await collect(changes(nats_cluster.url, STREAM_PREFIX, 2, from_="start"), 1)
    with pytest.raises(FeedError, match="no streams named nothing-<n>"):
        await collect(changes(nats_cluster.url, "nothing", None, from_="start"), 1)


async def test_unreachable_nats_is_a_clear_error():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FeedError, match="cannot connect to NATS"):
        await collect(changes(f"nats://127.0.0.1:{port}", STREAM_PREFIX, 1, connect_options={"connect_timeout": 2}), 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shards": 0}, "shards"),
        ({"shards": "2"}, "shards"),
        ({"from_": "yesterday"}, "cannot start from"),
        ({"from_": 0}, ">= 1"),
        ({"ops": ["merge"]}, "unknown operation"),
        ({"stream_prefix": ""}, "stream prefix"),
    ],
)
async def test_bad_arguments_raise_feed_error_before_connecting(kwargs, message):
    arguments = {"stream_prefix": STREAM_PREFIX, "shards": 1, **kwargs}
    feed = changes("nats://127.0.0.1:1", **arguments)
    with pytest.raises(FeedError, match=message):
        with contextlib.suppress(StopAsyncIteration):
            await feed.__anext__()


def test_parse_start_forms():
    from nats.js.api import DeliverPolicy

    assert parse_start("now").policy is DeliverPolicy.NEW
    assert parse_start("start").policy is DeliverPolicy.ALL
    assert parse_start("42").seq == 42
    moment = parse_start("2024-05-01T12:00:00Z").time
    assert moment is not None and moment.isoformat() == "2024-05-01T12:00:00+00:00"
    assert parse_start("2024-05-01T14:00:00+02:00").time == moment


def test_json_value_markers():
    assert json_value(b"\x00\x01") == {"$base64": "AAE="}
    assert json_value(math.nan) == {"$float": "nan"}
    assert json_value(math.inf) == {"$float": "inf"}
    assert json_value(-math.inf) == {"$float": "-inf"}
    for plain in (0, -(2**63), 0.1, -0.0, "text", None):
        assert json_value(plain) is plain


async def test_feed_ends_with_feed_error_when_nats_is_gone_for_good(nats_server):
    nc = await nats.connect(nats_server.urls, connect_timeout=10)
    try:
        await create_shard_streams(nc.jetstream(timeout=30), 1, replicas=1)
        await publish(nc.jetstream(timeout=30), batch_of(1, up("t", 1, 1, v="x")))
    finally:
        await nc.close()
    feed = changes(
        nats_server.url,
        STREAM_PREFIX,
        1,
        from_="start",
        connect_options={"max_reconnect_attempts": 1, "reconnect_time_wait": 0.2, "connect_timeout": 1},
    )
    try:
        first = await asyncio.wait_for(feed.__anext__(), WAIT_S)
        assert first.values == {"id": 1, "v": "x"}
        nats_server.stop()
        with pytest.raises(FeedError, match="connection to NATS closed"):
            await asyncio.wait_for(feed.__anext__(), WAIT_S)
    finally:
        await feed.aclose()


async def test_setup_requests_repeat_transient_errors_only():
    """Set-up right after a cluster starts may time out: repeated, bounded; a real refusal
    (stream missing) is not repeated. The feed, the node start-up and the snapshot buckets
    share this helper."""
    import nats.errors
    import nats.js.errors

    from marmot_appliance.replication.streams import retry_while_settling

    attempts = []

    async def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise nats.errors.TimeoutError
        return "answer"

    assert await retry_while_settling("test", flaky, 30.0) == "answer" and len(attempts) == 3

    async def missing():
        attempts.append(1)
        raise nats.js.errors.NotFoundError

    attempts.clear()
    with pytest.raises(nats.js.errors.NotFoundError):
        await retry_while_settling("test", missing, 30.0)
    assert len(attempts) == 1

    attempts.clear()
    with pytest.raises(nats.errors.TimeoutError):  # the deadline bounds the repeats
        await retry_while_settling("test", lambda: _always_timing_out(attempts), 0.5)
    assert 1 <= len(attempts) <= 3


async def _always_timing_out(attempts):
    attempts.append(1)
    raise nats.errors.TimeoutError
