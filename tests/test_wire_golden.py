"""The publisher's messages are byte for byte what they were before the codec owned the wire.

The digests below were taken from the publisher's own encoder (`_encode_rows`) before it moved
into the codec (issue 17, item 1). Every case feeds fixed raw log rows (what
capture.read_pending_rows returns) through the publisher's batching and the codec, and hashes
everything a receiver or JetStream sees: shard, log ids, Nats-Msg-Id, the continuation flag and
the payload (compressed cases assume the pinned zstandard build). A change of any byte on the wire fails here; if a wire change is ever intended,
docs/wire-format.md changes with it and these digests are retaken.
"""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from marmot_appliance.replication import codec
from marmot_appliance.replication.batching import BatchBuilder, mark_continuations
from marmot_appliance.replication.capture import PendingRows
from marmot_appliance.replication.change_log import LogLayout
from marmot_appliance.replication.types import ChangeBatch, RowChange
from marmot_appliance.spec.model import BatchLimits, CompressionSettings, ReplicationSettings

BASE = 7_000_000 << 16  # log ids are clock values
NAN_WITH_PAYLOAD = struct.unpack(">d", b"\x7f\xf8\x00\x00\x00\x00\x00\x2a")[0]
INCOMPRESSIBLE = random.Random(17).randbytes(150_000)  # travels as fragments
ODD = [0.1, -0.0, 2**63 - 1, -(2**63), None, "", b"", b"\x00\xff", "\u00e9\U0001f600", 1e308, 7]

ITEMS = LogLayout(1, "items", ("id", "n", "price", "label", "data"), ("id",), "fp-items-1", (0,))
ITEMS_2 = LogLayout(2, "items", ("id", "n", "price", "label", "data", "extra"), ("id",), "fp-items-2", (0,))
PAIRS = LogLayout(3, "pairs", ("a", "b", "v"), ("b", "a"), "fp-pairs", (1, 0))
WIDE = LogLayout(4, "wide", tuple(f"c{i}" for i in range(12)), ("c0",), "fp-wide", (0,))
LAYOUTS = {layout.id: layout for layout in (ITEMS, ITEMS_2, PAIRS, WIDE)}


def _mixed_rows() -> list[tuple]:
    rows: list[tuple] = []
    log_id = BASE
    for i in range(700):
        log_id += 1
        rows.append((log_id, 1, 0, f"k{i}", ODD[i % len(ODD)], i * 0.1, None if i % 3 else "x" * i, bytes([i % 256]) * (i % 7)))
    for i in range(150):
        log_id += 1
        rows.append((log_id, 3, 0, i, f"b{i}", ODD[i % len(ODD)]))
    for i in range(0, 700, 7):  # deletes carry the key in the layout's pk positions, rest null
        log_id += 1
        rows.append((log_id, 1, 1, f"k{i}", None, None, None, None))
    for i in range(40):  # a key change: delete + upsert, interleaved
        log_id += 1
        rows.append((log_id, 3, 1, i, f"b{i}", None))
        log_id += 1
        rows.append((log_id, 3, 0, i + 1000, f"b{i}", "moved"))
    for i in range(0, 700, 5):  # a second layout of the same table (a column was added)
        log_id += 1
        rows.append((log_id, 2, 0, f"k{i}", i, NAN_WITH_PAYLOAD if i == 35 else 1.5, "again", None, i))
    return rows


def _digest(batches) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(repr((batch.shard, batch.log_ids, batch.msg_id, batch.more, batch.oversized)).encode())
        digest.update(batch.payload)
    return digest.hexdigest()


def _build(rows, *, shards=1, max_payload=1024 * 1024, batch=BatchLimits(), compression=CompressionSettings(), cut=False):
    settings = ReplicationSettings(shards=shards, batch=batch, compression=compression)
    builder = BatchBuilder(5, settings, max_payload)
    read = PendingRows(rows, dict(LAYOUTS), {}, 5)
    return mark_continuations(builder.build_rows(read), cut)


CASES = {
    "mixed, one shard": (lambda: _build(_mixed_rows()), "mixed1"),
    "mixed, three shards, read cut": (lambda: _build(_mixed_rows(), shards=3, cut=True), "mixed3"),
    "uncompressed": (lambda: _build(_mixed_rows(), compression=CompressionSettings(level=0)), "plain"),
    "cut by bytes": (
        lambda: _build([(BASE + i, 1, 0, f"big{i}", i, 0.5, "y" * 3000, None) for i in range(200)], max_payload=4096 + 20_000),
        "bytes",
    ),
    "cut by CBOR items": (
        lambda: _build([(BASE + i, 4, 0, *range(i, i + 12)) for i in range(12_000)], batch=BatchLimits(max_rows=20_000, max_bytes=64 << 20),
                       max_payload=64 << 20),
        "items",
    ),
    "a large row in fragments": (
        lambda: _build([(BASE + 1, 1, 0, "small", 1, 1.0, "a", None),
                        (BASE + 2, 1, 0, "large", 2, 2.0, "b", INCOMPRESSIBLE),
                        (BASE + 3, 1, 1, "small", None, None, None, None)], max_payload=4096 + 20_000),
        "fragments",
    ),
}

EXPECTED = {
    "mixed1": "5aefce1b74ee087baf28315b325abf061529a6cf5be810d327431b82558ac962",
    "mixed3": "e2dcad23bba1b490e67d75a0e18cf776ce494ef87c238551bd33bba00ce1de34",
    "plain": "2df4a97a3fb1007222de1fa459b39f9be1bb16b337dd1c415bc8ff3a0b6bf898",
    "bytes": "3a3d52d6094a536f75de654cef75f17cfade2836381fa1fd48a2a73d4c036a6b",
    "items": "3c9f0474b63c900d17e33efa96224c42e07e3e325ad9a02daed5dc6686f66470",
    "fragments": "fb4d71f173e22f9b1f8f5ac0a15cd830f19578acbec78bbe39946cceea276a71",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_publisher_messages_are_byte_identical_to_before(case):
    build, key = CASES[case]
    batches = build()
    assert batches
    assert _digest(batches) == EXPECTED[key]


def test_every_message_decodes_to_the_rows_it_was_built_from():
    """Not only the same bytes: the bytes say what the rows say (versions, keys, layouts)."""
    rows = _mixed_rows()
    by_id = {row[0]: row for row in rows}
    for batch in _build(rows, shards=3):
        decoded = codec.decode_batch(batch.payload)
        assert [change.version for change in decoded.rows] == list(batch.log_ids)
        for change in decoded.rows:
            raw = by_id[change.version]
            layout = LAYOUTS[raw[1]]
            assert change.table == layout.table
            assert decoded.fingerprints[change.table] in {ITEMS.fingerprint, ITEMS_2.fingerprint, PAIRS.fingerprint}
            if raw[2] == 0:
                assert change.op == "upsert" and change.columns == layout.columns
                assert [struct.pack(">d", v) if type(v) is float else v for v in change.values] == [
                    struct.pack(">d", v) if type(v) is float else v for v in raw[3:]]
            else:
                assert change.op == "delete" and change.columns == layout.primary_key
                assert change.pk == tuple(raw[3 + i] for i in layout.pk_indexes)


def test_the_object_encoder_gives_the_same_bytes_as_the_publisher():
    """codec.encode_batch on the rows as objects == the publisher's message, byte for byte."""
    rows = [row for row in _mixed_rows() if row[1] != 2]  # one layout per table in a batch
    (batch,) = _build(rows[:400])
    changes = PendingRows(rows[:400], dict(LAYOUTS), {}, 5).pending_changes()
    tables = list(dict.fromkeys(change.change.table for change in changes))  # first appearance
    layouts = {layout.table: layout for layout in (ITEMS, PAIRS)}
    as_objects = ChangeBatch(
        origin=5,
        rows=tuple(change.change for change in changes),
        fingerprints={table: layouts[table].fingerprint for table in tables},
        primary_keys={table: layouts[table].primary_key for table in tables},
    )
    assert codec.encode_batch(as_objects) == batch.payload
    assert isinstance(as_objects.rows[0], RowChange)
