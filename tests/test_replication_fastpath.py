"""The hot path's fast forms give the same results as the object-per-row forms they replace.

Publisher: capture.read_pending_rows + BatchBuilder.build_rows + capture.mark_rows_published
(its messages are byte for byte codec.encode_batch of the same rows as RowChange objects).
Receiver: codec.decode_for_apply (GroupedBatch) + BatchApplier.apply_many on row groups.
"""

from __future__ import annotations

import sqlite3
import struct

import cbor2
import pytest

from marmot_appliance.replication import codec
from marmot_appliance.replication.applier import BatchApplier
from marmot_appliance.replication.batching import BatchBuilder
from marmot_appliance.replication.capture import ChangeCapture
from marmot_appliance.replication.digest import table_digest
from marmot_appliance.replication.types import ChangeBatch, RowChange
from marmot_appliance.spec.model import ReplicationSettings
from tests.harness import settled

SCHEMA = (
    "CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER, price REAL, label TEXT, data BLOB);"
    "CREATE TABLE pairs (a INTEGER, b TEXT, v, PRIMARY KEY (b, a));"
)
ODD_VALUES = [0.1, -0.0, 2**63 - 1, -(2**63), None, "", b"", b"\x00\xff", "\u00e9\U0001f600", 1e308, 7]
BASE = 1 << 50


def _write_mixed(db) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO items VALUES (?, ?, ?, ?, ?)",
        [(f"k{i}", ODD_VALUES[i % len(ODD_VALUES)], i * 0.1, None if i % 3 else "x" * i, bytes([i % 256]) * (i % 7))
         for i in range(700)],
    )
    conn.executemany("INSERT INTO pairs VALUES (?, ?, ?)", [(i, f"b{i}", ODD_VALUES[i % len(ODD_VALUES)]) for i in range(150)])
    conn.execute("COMMIT")
    conn.execute("DELETE FROM items WHERE rowid % 7 = 0")
    conn.execute("UPDATE pairs SET a = a + 1000 WHERE a < 40")  # key change: delete + upsert
    conn.execute("UPDATE items SET label = 'again' WHERE rowid % 5 = 0")
    conn.close()


def _bits(rows):
    """Rows with floats as their bit patterns, so 0.0 / -0.0 compare as different."""
    def exact(value):
        return ("f", struct.pack(">d", value)) if isinstance(value, float) else (type(value).__name__, value)

    return [(r.table, r.op, tuple(map(exact, r.pk)), r.columns, tuple(map(exact, r.values)), r.version, r.origin)
            for r in rows]


def _as_objects(pending, log_ids, primary_keys) -> ChangeBatch:
    """The rows of one message as a ChangeBatch of RowChange objects (capture.read_pending)."""
    by_id = {item.log_id: item for item in pending}
    items = [by_id[log_id] for log_id in log_ids]
    fingerprints: dict[str, str] = {}
    for item in items:  # tables in first-appearance order; a table's last layout wins
        fingerprints[item.change.table] = item.fingerprint
    return ChangeBatch(
        origin=1,
        rows=tuple(item.change for item in items),
        fingerprints=fingerprints,
        primary_keys={table: primary_keys[table] for table in fingerprints},
    )


@pytest.mark.parametrize("shards", [1, 3])
def test_build_rows_encodes_the_same_bytes_as_the_codec_on_objects(wal_db, shards):
    db = wal_db(schema=SCHEMA)
    with ChangeCapture(db, 1) as capture:
        capture.install()
        _write_mixed(db)
        builder = BatchBuilder(1, ReplicationSettings(shards=shards), 1024 * 1024)
        read = capture.read_pending_rows(100_000)
        fast = builder.build_rows(read)
        pending = capture.read_pending(100_000)
        primary_keys = capture.primary_keys()
    assert len(read) > 1000
    assert sorted(i for b in fast for i in b.log_ids) == sorted(p.log_id for p in pending)
    assert len({b.shard for b in fast}) == shards
    for batch in fast:
        as_objects = _as_objects(pending, batch.log_ids, primary_keys)
        assert batch.payload == codec.encode_batch(as_objects)
        decoded = codec.decode_batch(batch.payload)
        assert _bits(decoded.rows) == _bits(as_objects.rows)
        assert decoded.fingerprints == as_objects.fingerprints
        assert decoded.primary_keys == as_objects.primary_keys


def test_build_rows_respects_max_bytes_and_max_payload(wal_db):
    db = wal_db(schema=SCHEMA)
    with ChangeCapture(db, 1) as capture:
        capture.install()
        conn = sqlite3.connect(db)
        conn.executemany("INSERT INTO items (id, label) VALUES (?, ?)", [(f"big{i}", "y" * 3000) for i in range(200)])
        conn.commit()
        settings = ReplicationSettings()
        builder = BatchBuilder(1, settings, max_payload=4096 + 20_000)
        batches = builder.build_rows(capture.read_pending_rows(1000))
    assert len(batches) > 1
    assert all(len(b.payload) <= 20_000 for b in batches)
    assert sorted(i for b in batches for i in b.log_ids) == sorted(i for b in batches for i in b.log_ids)
    assert sum(len(b.log_ids) for b in batches) == 200


def test_mark_rows_published_removes_exactly_the_acknowledged_rows(wal_db):
    db = wal_db(schema=SCHEMA)
    with ChangeCapture(db, 1) as capture:
        capture.install()
        _write_mixed(db)
        read = capture.read_pending_rows(500)
        ids = [row[0] for row in read.rows]
        acked = ids[:100] + ids[150:400] + ids[401:]  # holes, as after a failed batch
        # Rows committed after the read must survive, although their ids lie above the ranges.
        conn = sqlite3.connect(db)
        conn.execute("INSERT INTO items (id) VALUES ('late')")
        conn.commit()
        assert capture.mark_rows_published(read, acked) == len(acked)
        left = [row[0] for row in capture.read_pending_rows(100_000).rows]
        assert set(ids) - set(acked) <= set(left)
        assert not set(acked) & set(left)
        assert any(row[0] > ids[-1] for row in capture.read_pending_rows(100_000).rows)
        # And the versions of the retired rows were folded first.
        versions = sqlite3.connect(db).execute('SELECT count(*) FROM "_marmot_ver_items"').fetchone()[0]
        assert versions > 0
        everything = capture.read_pending_rows(100_000)
        assert capture.mark_rows_published(everything) == len(everything)
        assert len(capture.read_pending_rows(100_000)) == 0


def _grouped(batch: ChangeBatch):
    decoded = codec.decode_for_apply(codec.encode_batch(batch))
    assert isinstance(decoded, codec.GroupedBatch)
    return decoded


def test_decode_for_apply_gives_the_rows_of_decode_batch():
    rows = []
    for i, value in enumerate(ODD_VALUES * 3):
        rows.append(RowChange("items", "upsert", (f"k{i}",), ("id", "n"), (f"k{i}", value), BASE + i, 2))
    rows.append(RowChange("items", "delete", ("k1",), ("id",), ("k1",), BASE + 100, 2))
    rows.append(RowChange("items", "upsert", ("z",), ("id", "n"), ("z", 1), BASE + 101, 3))  # other origin
    batch = ChangeBatch(2, tuple(rows), {"items": "fp"}, {"items": ("id",)})
    grouped = _grouped(batch)
    assert grouped.row_count == len(rows)
    got = sorted(_bits(grouped.to_change_batch().rows), key=lambda r: r[5])
    assert got == _bits(codec.decode_batch(codec.encode_batch(batch)).rows)


@pytest.mark.parametrize(
    "bad_entry",
    [
        [0, BASE, ["k", True]],  # bool is not a storage class
        [0, BASE, ["k", 2**63]],  # beyond 64-bit
        [0, BASE, ["k"]],  # too narrow
        [0, BASE, ["k", [1]]],  # a nested list is no value
        [True, BASE, ["k", 1]],  # bool group index
        [0, 1.5, ["k", 1]],  # float version
        [0, BASE, ["k", 1], 2**64],  # origin beyond 64-bit
        [5, BASE, ["k", 1]],  # unknown group
    ],
)
def test_decode_for_apply_refuses_what_decode_batch_refuses(bad_entry):
    body = {"o": 2, "t": [["items", None, ["id"]]], "g": [[0, "upsert", ["id", "n"], [0]]],
            "r": [[0, BASE, ["ok", 1]], bad_entry]}
    payload = bytes((codec.FORMAT_VERSION, 0)) + cbor2.dumps(body)
    with pytest.raises(codec.CodecError) as strict:
        codec.decode_batch(payload)
    with pytest.raises(codec.CodecError) as fast:
        codec.decode_for_apply(payload)
    assert str(fast.value) == str(strict.value)


def test_decode_for_apply_keeps_rows_with_explicit_keys_as_a_change_batch():
    body = {"o": 2, "t": [["items", None, None]], "g": [[0, "upsert", ["id", "n"], None]],
            "r": [[0, BASE, ["a", 1], 2, ["a"]]]}
    payload = bytes((codec.FORMAT_VERSION, 0)) + cbor2.dumps(body)
    decoded = codec.decode_for_apply(payload)
    assert isinstance(decoded, ChangeBatch)
    assert decoded.rows == codec.decode_batch(payload).rows


def test_grouped_and_row_batches_apply_to_identical_databases(wal_db):
    """Last writer wins, tombstones, stale rows, duplicates within a batch: same outcome either way."""
    schema = "CREATE TABLE items (id TEXT PRIMARY KEY, n); CREATE TABLE pairs (a INTEGER, b TEXT, v, PRIMARY KEY (b, a));"
    rounds = []
    for r in range(4):
        rows = []
        for i in range(60):
            version = BASE + (i * 7919 + r * 104729) % 1000  # versions out of order across rounds
            origin = 2 + (i + r) % 2
            if (i + r) % 5 == 0:
                rows.append(RowChange("items", "delete", (f"k{i % 40}",), ("id",), (f"k{i % 40}",), version, origin))
            else:
                rows.append(RowChange("items", "upsert", (f"k{i % 40}",), ("id", "n"), (f"k{i % 40}", ODD_VALUES[(i + r) % len(ODD_VALUES)]), version, origin))
            rows.append(RowChange("pairs", "upsert", (f"b{i % 9}", i % 3), ("a", "b", "v"), (i % 3, f"b{i % 9}", r * 100 + i), version, origin))
        rounds.append(ChangeBatch(2, tuple(rows), {}, {"items": ("id",), "pairs": ("b", "a")}))
    dbs = []
    for grouped in (False, True):
        db = wal_db(f"{'grouped' if grouped else 'rows'}.db", schema)
        with BatchApplier(db, 1) as applier:
            items = [(_grouped(b) if grouped else b, "s-1", seq) for seq, b in enumerate(rounds, 1)]
            outcomes = applier.apply_many(items[:2]) + [applier.apply(*items[2]), applier.apply(*items[3])]
        dbs.append((db, [(o.rows_applied, o.rows_stale, o.max_version) for o in outcomes]))
    (rows_db, rows_outcomes), (grouped_db, grouped_outcomes) = dbs
    assert rows_outcomes == grouped_outcomes
    assert table_digest(rows_db, ["items", "pairs"]) == table_digest(grouped_db, ["items", "pairs"])
    for table in ("items", "pairs", "_marmot_ver_items", "_marmot_ver_pairs", "_marmot_positions"):
        a, b = (sqlite3.connect(db).execute(f'SELECT *, typeof(2) FROM "{table}" ORDER BY 1, 2').fetchall()
                for db in (rows_db, grouped_db))
        assert a == b and a


def test_reads_above_a_cursor_and_merged_retires(wal_db):
    """A pipelined publisher reads past rows in flight, then retires several reads at once."""
    db = wal_db(schema=SCHEMA)
    with ChangeCapture(db, 1) as capture:
        capture.install()
        _write_mixed(db)
        total = capture.pending_count()
        first = capture.read_pending_rows(300)
        second = capture.read_pending_rows(300, after_id=first.rows[-1][0])
        everything = capture.read_pending_rows(100_000)
        assert [r[0] for r in first.rows + second.rows] == [r[0] for r in everything.rows[:600]]
        assert capture.read_pending_rows(10, after_id=everything.rows[-1][0]).rows == []
        capture.use_retire_connection()  # retires on a second connection, reads go on
        merged = type(first).merged([first, second])
        assert capture.mark_rows_published(merged) == 600
        assert capture.pending_count() == total - 600
        rest = capture.read_pending_rows(100_000)
        assert [r[0] for r in rest.rows] == [r[0] for r in everything.rows[600:]]


async def test_pipelined_publisher_publishes_everything_once(wal_db, nats_server):
    """Publisher.run (reads while acks are pending) sends every row once and retires it."""
    import asyncio

    import nats

    from marmot_appliance.node.status import RuntimeStatus
    from marmot_appliance.observability.metrics import Metrics
    from marmot_appliance.replication.db_thread import DbThread
    from marmot_appliance.replication.publisher import Publisher
    from marmot_appliance.replication.streams import ensure_streams
    from marmot_appliance.spec.model import BatchLimits

    class Wakeup:
        async def wait(self, timeout_s=None):
            await asyncio.sleep(0.005)
            return True

        def notify(self):
            pass

    db = wal_db(schema=SCHEMA)
    nc = await nats.connect(nats_server.urls, connect_timeout=10)
    js = nc.jetstream(timeout=10)
    replication = ReplicationSettings(shards=2, batch=BatchLimits(max_rows=50))
    await ensure_streams(js, replication, 1)
    capture_db, retire_db = DbThread("cap"), DbThread("ret")
    capture = await capture_db.run(ChangeCapture, str(db), 1, None)
    await capture_db.run(capture.install)
    await capture_db.run(capture.use_retire_connection)
    publisher = Publisher(js, capture, capture_db, 1, replication, nc.max_payload, Wakeup(), Metrics(),
                          RuntimeStatus("n1", str(db)), read_limit=120, retire_db=retire_db)
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    try:
        conn = sqlite3.connect(db, isolation_level=None)
        for start in range(0, 2000, 25):  # commits keep arriving while rounds are in flight
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO items (id, n) VALUES (?, ?)", [(f"p{i}", i) for i in range(start, start + 25)])
            conn.execute("COMMIT")
            await asyncio.sleep(0)
        conn.close()
        for _ in range(600):
            if await capture_db.run(capture.pending_count) == 0:
                break
            await asyncio.sleep(0.05)
        assert await capture_db.run(capture.pending_count) == 0
        stop.set()
        await asyncio.wait_for(task, 60)
        seen = []
        for shard in (1, 2):
            info = await settled(lambda: js.stream_info(replication.stream_name(shard)))
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(replication.stream_name(shard), seq)
                seen += [r.pk[0] for r in codec.decode_batch(msg.data).rows]
        assert sorted(seen) == sorted(f"p{i}" for i in range(2000))  # every row, none twice
    finally:
        stop.set()
        if not task.done():
            task.cancel()
        await capture_db.run(capture.close)
        capture_db.shutdown()
        retire_db.shutdown()
        await nc.close()
