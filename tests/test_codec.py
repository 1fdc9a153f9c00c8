"""The wire codec: exact round trips, the envelope, and refusal of malformed payloads."""

from __future__ import annotations

import math
import os
import sqlite3
import struct
import threading

import cbor2
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from marmot_appliance.errors import MarmotError
from marmot_appliance.replication import codec
from marmot_appliance.replication.codec import (
    FLAG_ZSTD,
    FORMAT_VERSION,
    MSG_ID_HEADER,
    ORIGIN_HEADER,
    BatchCodec,
    CodecError,
    decode_batch,
    encode_batch,
)
from marmot_appliance.replication.types import ChangeBatch, RowChange
from marmot_appliance.spec.model import CompressionSettings

NO_COMPRESSION = CompressionSettings(level=0, min_bytes=0)
ALWAYS_COMPRESS = CompressionSettings(level=3, min_bytes=0)


def float_bits(value: float) -> bytes:
    return struct.pack(">d", value)


def exact_key(value):
    """A comparison key that tells 0.0 from -0.0 and NaN payloads apart, and int from float."""
    if isinstance(value, float):
        return ("float", float_bits(value))
    return (type(value).__name__, value)


def assert_rows_exact(decoded: ChangeBatch, original: ChangeBatch) -> None:
    assert decoded.origin == original.origin
    assert decoded.fingerprints == original.fingerprints
    assert decoded.primary_keys == original.primary_keys
    assert len(decoded.rows) == len(original.rows)
    for got, want in zip(decoded.rows, original.rows):
        assert (got.table, got.op, got.columns, got.version, got.origin) == (
            want.table,
            want.op,
            want.columns,
            want.version,
            want.origin,
        )
        assert [exact_key(v) for v in got.values] == [exact_key(v) for v in want.values]
        assert [exact_key(v) for v in got.pk] == [exact_key(v) for v in want.pk]
        assert isinstance(got.values, tuple) and isinstance(got.pk, tuple)


def upsert(table, columns, values, version=1, origin=1, pk_index=0):
    return RowChange(table, "upsert", (values[pk_index],), tuple(columns), tuple(values), version, origin)


NAN_WITH_PAYLOAD = struct.unpack(">d", bytes.fromhex("7ff8000000000abc"))[0]
NEGATIVE_NAN = struct.unpack(">d", bytes.fromhex("fff8000000000001"))[0]

EVERY_STORAGE_CLASS = [
    0,
    1,
    -1,
    2**63 - 1,
    -(2**63),
    2**32,
    0.1,
    -0.0,
    0.0,
    1e308,
    5e-324,
    math.inf,
    -math.inf,
    math.nan,
    NAN_WITH_PAYLOAD,
    NEGATIVE_NAN,
    "",
    "plain",
    "emb\x00edded NUL",
    "non-BMP \U0001f600 \U00010348",
    "x" * 1_000_000,
    b"",
    b"\x00\xff\x00binary",
    bytes(range(256)) * 10,
    None,
]


@pytest.mark.parametrize("compression", [NO_COMPRESSION, ALWAYS_COMPRESS], ids=["plain", "zstd"])
def test_every_storage_class_round_trips_bit_exact(compression):
    rows = tuple(
        upsert("t", ("id", "v"), (i, value), version=(1_700_000_000_000 << 16) + i, origin=3)
        for i, value in enumerate(EVERY_STORAGE_CLASS)
    )
    batch = ChangeBatch(origin=3, rows=rows, fingerprints={"t": "fp-t"}, primary_keys={"t": ("id",)})
    payload = encode_batch(batch, compression)
    assert_rows_exact(decode_batch(payload), batch)


def test_values_read_from_sqlite_round_trip(tmp_path):
    """The values the capture side really sees: read back from a real SQLite file."""
    conn = sqlite3.connect(tmp_path / "v.db")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, i INTEGER, r REAL, s TEXT, b BLOB, n)")
    conn.execute(
        "INSERT INTO t VALUES (?, ?, ?, ?, ?, ?)",
        (1, -(2**63), -0.0, "z\x00\U0001f600" * 1000, b"\x00\x01" * 5000, None),
    )
    conn.execute("INSERT INTO t VALUES (2, 9223372036854775807, 0.1, '', x'', NULL)")
    conn.commit()
    columns = ("id", "i", "r", "s", "b", "n")
    rows = tuple(
        upsert("t", columns, values, version=10 + i)
        for i, values in enumerate(conn.execute("SELECT * FROM t ORDER BY id"))
    )
    conn.close()
    batch = ChangeBatch(origin=1, rows=rows, primary_keys={"t": ("id",)})
    assert_rows_exact(decode_batch(encode_batch(batch, CompressionSettings())), batch)


def test_batch_order_groups_and_explicit_fields_survive():
    """Rows keep commit order across groups; odd origins and non-derivable pks are kept."""
    pk_cols = {"a": ("k1", "k2"), "b": ("id",)}
    rows = (
        RowChange("a", "upsert", ("x", 1), ("k1", "k2", "v"), ("x", 1, 0.5), 10, 1),
        RowChange("b", "delete", (7,), ("id",), (7,), 11, 1),
        RowChange("a", "delete", ("x", 1), ("k1", "k2"), ("x", 1), 12, 1),
        RowChange("b", "upsert", (7,), ("id", "w"), (7, b"z"), 13, 2),  # relayed origin
        RowChange("a", "upsert", ("y", 2), ("k1", "k2", "v"), ("y", 2, None), 14, 1),
        # pk not the projection of values: must be carried explicitly
        RowChange("b", "upsert", (8,), ("id", "w"), (9, b"q"), 15, 1),
        # a float pk equal to but not bit-identical with the value (0.0 vs -0.0)
        RowChange("c", "upsert", (0.0,), ("f",), (-0.0,), 16, 1),
        # a table without known primary-key columns
        RowChange("d", "upsert", ("r",), ("x",), ("r",), 17, 1),
    )
    batch = ChangeBatch(
        origin=1, rows=rows, fingerprints={"a": "fa", "b": "fb"}, primary_keys={**pk_cols, "c": ("f",)}
    )
    decoded = decode_batch(encode_batch(batch, NO_COMPRESSION))
    assert_rows_exact(decoded, batch)
    assert decoded == batch


def test_empty_batch_round_trips():
    batch = ChangeBatch(origin=9, rows=())
    assert decode_batch(encode_batch(batch)) == batch


def test_envelope_version_and_compression_flag():
    small = ChangeBatch(origin=1, rows=(upsert("t", ("id",), (1,)),), primary_keys={"t": ("id",)})
    big = ChangeBatch(
        origin=1,
        rows=tuple(upsert("t", ("id", "v"), (i, "repetitive text " * 4)) for i in range(200)),
        primary_keys={"t": ("id",)},
    )
    settings_ = CompressionSettings(level=3, min_bytes=512)
    small_payload = encode_batch(small, settings_)
    big_payload = encode_batch(big, settings_)
    assert small_payload[0] == FORMAT_VERSION and small_payload[1] == 0
    assert cbor2.loads(small_payload[2:])["o"] == 1
    assert big_payload[0] == FORMAT_VERSION and big_payload[1] == FLAG_ZSTD
    assert zstandard.frame_content_size(big_payload[2:]) > len(big_payload)
    # level 0 disables compression whatever the size
    assert encode_batch(big, CompressionSettings(level=0, min_bytes=0))[1] == 0
    assert decode_batch(big_payload) == big


def test_incompressible_body_is_sent_plain():
    batch = ChangeBatch(
        origin=1, rows=(upsert("t", ("id", "b"), (1, os.urandom(4000))),)
    )
    payload = encode_batch(batch, ALWAYS_COMPRESS)
    assert payload[1] == 0
    assert decode_batch(payload) == batch


def test_rows_are_compact_table_and_columns_not_repeated():
    columns = ("id", "a_rather_long_column_name", "another_long_column_name")
    batch = ChangeBatch(
        origin=1,
        rows=tuple(upsert("a_long_table_name", columns, (i, i, i)) for i in range(100)),
        primary_keys={"a_long_table_name": ("id",)},
    )
    body = encode_batch(batch, NO_COMPRESSION)[2:]
    assert body.count(b"a_long_table_name") == 1
    assert body.count(b"a_rather_long_column_name") == 1


def test_header_constants():
    assert MSG_ID_HEADER == "Nats-Msg-Id"
    assert ORIGIN_HEADER == "Marmot-Origin"
    assert issubclass(CodecError, MarmotError)


def test_encode_rejects_what_sqlite_cannot_hold():
    with pytest.raises(CodecError):
        encode_batch(ChangeBatch(origin=1, rows=(RowChange("t", "merge", (1,), ("id",), (1,), 1, 1),)))
    with pytest.raises(CodecError):
        encode_batch(ChangeBatch(origin=1, rows=(RowChange("t", "upsert", (1,), ("id", "v"), (1,), 1, 1),)))
    with pytest.raises(CodecError):
        encode_batch(ChangeBatch(origin=1, rows=(upsert("t", ("id", "v"), (1, object())),)))


def valid_payload(compression=NO_COMPRESSION) -> bytes:
    rows = tuple(upsert("t", ("id", "v"), (i, f"value {i}")) for i in range(20))
    return encode_batch(ChangeBatch(origin=1, rows=rows, primary_keys={"t": ("id",)}), compression)


def body_payload(document) -> bytes:
    return bytes((FORMAT_VERSION, 0)) + cbor2.dumps(document)


GOOD_DOC = {"o": 1, "t": [["t", None, ["id"]]], "g": [[0, "upsert", ["id", "v"], [0]]], "r": [[0, 5, [1, 2]]]}


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01",
        b"\x02\x00" + cbor2.dumps(GOOD_DOC),  # unknown version
        b"\x01\x80" + cbor2.dumps(GOOD_DOC),  # unknown flag
        b"\x01\x01" + cbor2.dumps(GOOD_DOC),  # flagged zstd but not a frame
        b"\x01\x00\xff\xff",
        body_payload([1, 2, 3]),
        body_payload({**GOOD_DOC, "o": "one"}),
        body_payload({**GOOD_DOC, "o": 2**64 - 1}),
        body_payload({k: v for k, v in GOOD_DOC.items() if k != "r"}),
        body_payload({**GOOD_DOC, "t": [["t", 5, ["id"]]]}),
        body_payload({**GOOD_DOC, "t": [["t", None, ["id"]], ["t", None, None]]}),
        body_payload({**GOOD_DOC, "g": [[1, "upsert", ["id", "v"], [0]]]}),
        body_payload({**GOOD_DOC, "g": [[0, "merge", ["id", "v"], [0]]]}),
        body_payload({**GOOD_DOC, "g": [[0, "upsert", ["id", "v"], [2]]]}),
        body_payload({**GOOD_DOC, "g": [[0, "upsert", ["id", "v"], None]]}),  # no pk anywhere
        body_payload({**GOOD_DOC, "r": [[1, 5, [1, 2]]]}),
        body_payload({**GOOD_DOC, "r": [[0, 5, [1]]]}),
        body_payload({**GOOD_DOC, "r": [[0, 5.0, [1, 2]]]}),
        body_payload({**GOOD_DOC, "r": [[0, True, [1, 2]]]}),
        body_payload({**GOOD_DOC, "r": [[0, 5, [1, [2]]]]}),
        body_payload({**GOOD_DOC, "r": [[0, 5, [1, {"a": 1}]]]}),
        body_payload({**GOOD_DOC, "r": [[0, 5, [1, True]]]}),
        body_payload({**GOOD_DOC, "r": [[0, 5, [1, 2**63]]]}),
        body_payload({**GOOD_DOC, "r": [[0, 5, [1, 2**70]]]}),
        body_payload({**GOOD_DOC, "r": [[0, 5, [1, cbor2.CBORTag(1000, 1)]]]}),
        body_payload({**GOOD_DOC, "r": [[0, 5, [1, 2], 1, 7]]}),
        body_payload({**GOOD_DOC, "r": [[0, 5, [1, 2], 1, [1], 9]]}),
        bytes((1, 0)) + b"\x81" * 100 + b"\x00",  # deep nesting
    ],
)
def test_malformed_payloads_raise_codec_error(payload):
    with pytest.raises(CodecError):
        decode_batch(payload)


def test_good_document_is_accepted():
    """The malformed cases above differ from this one in one place each."""
    batch = decode_batch(body_payload(GOOD_DOC))
    assert batch.rows == (RowChange("t", "upsert", (1,), ("id", "v"), (1, 2), 5, 1),)


def test_zip_bomb_is_refused():
    bomb_body = b"\x00" * (codec.MAX_DECODED_BYTES + 1)
    with_size = zstandard.ZstdCompressor(level=1).compress(bomb_body)
    without_size = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bomb_body)
    for frame in (with_size, without_size):
        assert len(frame) < 100_000
        with pytest.raises(CodecError):
            decode_batch(bytes((FORMAT_VERSION, FLAG_ZSTD)) + frame)


def test_small_limit_codec_refuses_plain_body_too():
    small = BatchCodec(max_decoded_bytes=100)
    with pytest.raises(CodecError):
        small.decode(valid_payload())


def test_trailing_garbage_after_zstd_frame_is_refused():
    payload = valid_payload(ALWAYS_COMPRESS)
    assert payload[1] == FLAG_ZSTD
    decode_batch(payload)
    with pytest.raises(CodecError):
        decode_batch(payload + b"junk")


def test_codec_is_safe_across_threads():
    codec_ = BatchCodec()
    batch = ChangeBatch(
        origin=1,
        rows=tuple(upsert("t", ("id", "v"), (i, "text " * 50)) for i in range(50)),
        primary_keys={"t": ("id",)},
    )
    errors: list[BaseException] = []

    def worker():
        try:
            for _ in range(30):
                assert codec_.decode(codec_.encode(batch, ALWAYS_COMPRESS)) == batch
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# -- property tests ---------------------------------------------------------------------------
sqlite_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=64).map(lambda b: struct.unpack(">d", (b + bytes(8))[:8])[0]),  # any bits
    st.text(max_size=40),
    st.binary(max_size=40),
    st.none(),
)


@st.composite
def batches(draw):
    tables = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3, unique=True))
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        table = draw(st.sampled_from(tables))
        width = draw(st.integers(1, 4))
        columns = tuple(f"c{i}" for i in range(width))
        values = tuple(draw(st.lists(sqlite_values, min_size=width, max_size=width)))
        op = draw(st.sampled_from(["upsert", "delete"]))
        rows.append(
            RowChange(
                table,
                op,
                (values[0],),
                columns,
                values,
                draw(st.integers(0, 2**63 - 1)),
                draw(st.sampled_from([1, 1, 2, 65535])),
            )
        )
    return ChangeBatch(
        origin=1,
        rows=tuple(rows),
        fingerprints={t: f"fp-{t}" for t in tables if draw(st.booleans())},
        primary_keys={t: ("c0",) for t in tables if draw(st.booleans())},
    )


@settings(max_examples=200, deadline=None)
@given(batch=batches(), compression=st.sampled_from([NO_COMPRESSION, ALWAYS_COMPRESS]))
def test_property_round_trip_is_exact(batch, compression):
    assert_rows_exact(decode_batch(encode_batch(batch, compression)), batch)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes_only_raise_codec_error(data):
    for payload in (data, bytes((FORMAT_VERSION, 0)) + data, bytes((FORMAT_VERSION, FLAG_ZSTD)) + data):
        try:
            decode_batch(payload)
        except CodecError:
            pass


@settings(max_examples=500, deadline=None)
@given(
    batch=batches(),
    compression=st.sampled_from([NO_COMPRESSION, ALWAYS_COMPRESS]),
    mutations=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_fuzz_mutated_valid_payloads_only_raise_codec_error(batch, compression, mutations, cut):
    payload = bytearray(encode_batch(batch, compression))
    for position, byte in mutations:
        payload[position % len(payload)] = byte
    if cut is not None:
        payload = payload[: cut % (len(payload) + 1)]
    try:
        decoded = decode_batch(bytes(payload))
    except CodecError:
        return
    assert isinstance(decoded, ChangeBatch)
    for row in decoded.rows:
        assert row.op in ("upsert", "delete")
        assert len(row.values) == len(row.columns)
        for value in row.values + row.pk:
            assert type(value) in (int, float, str, bytes, type(None))


# -- bounded decoding (issue 11 item 4) ----------------------------------------------------------
def _item_bomb(fill: bytes, rows: int = 1000, per_row: int = 64_000) -> bytes:
    """A body shaped like a batch whose rows hold 64 million one-byte items (nulls or empty
    arrays): about 64 MB decoded, a few KB compressed. cbor2 alone built gigabytes from it."""
    row = b"\x83\x00\x00\x99" + per_row.to_bytes(2, "big") + fill * per_row
    header = b"\xa4" + cbor2.dumps("o") + b"\x01" + cbor2.dumps("t") + b"\x80" + cbor2.dumps("g") + b"\x80"
    return header + cbor2.dumps("r") + b"\x99" + rows.to_bytes(2, "big") + row * rows


@pytest.mark.parametrize("fill", [b"\xf6", b"\x80", b"\x61a"], ids=["nulls", "empty-arrays", "short-texts"])
def test_compressed_item_bomb_is_refused_within_a_memory_bound(fill):
    """A message of at most a few KB that decompresses to 64 MB of tiny items is refused
    before cbor2 builds anything: peak traced memory stays under 20 MB (time is printed, not
    asserted: the machine is shared)."""
    import time
    import tracemalloc

    payload = bytes((FORMAT_VERSION, FLAG_ZSTD)) + zstandard.ZstdCompressor(level=19).compress(_item_bomb(fill, per_row=64_000 // len(fill)))
    assert len(payload) < 20_000
    started = time.perf_counter()
    with pytest.raises(CodecError, match="items"):
        decode_batch(payload)
    print(f"{len(payload)}-byte bomb refused in {time.perf_counter() - started:.3f} s")
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CodecError, match="items"):
            decode_batch(payload)
        with pytest.raises(CodecError, match="items"):
            codec.decode_for_apply(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"{len(payload)}-byte bomb refused twice in {time.perf_counter() - started:.3f} s (traced), peak {peak / 1e6:.1f} MB")
    assert peak < 20_000_000


def test_plain_item_bomb_and_declared_huge_arrays_are_refused():
    too_many = bytes((FORMAT_VERSION, 0)) + _item_bomb(b"\xf6", rows=3, per_row=60_000)
    with pytest.raises(CodecError, match="items"):
        decode_batch(too_many)
    declared = bytes((FORMAT_VERSION, 0)) + b"\x9b" + (2**40).to_bytes(8, "big") + b"\xf6" * (codec.MAX_CBOR_ITEMS + 8)
    with pytest.raises(CodecError, match="items"):
        decode_batch(declared)


@pytest.mark.parametrize(
    "body",
    [
        b"\x9f" + b"\xf6" * 200_000 + b"\xff",  # indefinite length
        b"\x81\xc1\x1a\x00\x00\x00\x00" + b"\x40" * 0 + b"\xf6" * 0,  # a tag
        b"\x81" * 20 + b"\xf6",  # nesting
        b"\xf7",  # undefined
    ],
    ids=["indefinite", "tag", "deep", "undefined"],
)
def test_structure_check_refuses_what_batches_never_hold(body):
    check = codec.StructureCheck()
    with pytest.raises(CodecError):
        check.feed(body)
        check.finish(body)


def test_a_large_legitimate_body_passes_the_structure_check():
    rows = tuple(RowChange("t", "upsert", (i,), ("id", "v"), (i, "x" * 300), i + 1, 1) for i in range(2000))
    batch = ChangeBatch(origin=1, rows=rows, primary_keys={"t": ("id",)})
    for compression in (NO_COMPRESSION, ALWAYS_COMPRESS):
        payload = encode_batch(batch, compression)
        assert len(codec.BatchCodec().body(payload)) > codec.MAX_CBOR_ITEMS  # the checked path
        assert decode_batch(payload).rows == rows


def test_uncompressed_size_never_raises():
    """Sizing a run must not fail on garbage (issue 10 case 16): it falls back to the length."""
    for payload in (b"\x01\x01\x09garbage", b"\x01\x01", b"\x01\x01\x28\xb5\x2f\xfd\xff", b""):
        assert codec.uncompressed_size(payload) == len(payload)


def test_dead_letter_payloads_are_bounded(tmp_path):
    from marmot_appliance.replication.applier import BatchApplier
    from marmot_appliance.replication.payload_bounds import MAX_KEPT_PAYLOAD_BYTES
    from marmot_appliance.replication.types import DEAD_LETTER_TABLE

    db = tmp_path / "dl.db"
    sqlite3.connect(db).execute("PRAGMA journal_mode=WAL").close()
    with BatchApplier(db, node_id=1) as applier:
        applier.dead_letter("s-1", 1, b"x" * (MAX_KEPT_PAYLOAD_BYTES * 10), "undecodable message: test")
        applier.dead_letter("s-1", 2, b"small", "undecodable message: small")
    conn = sqlite3.connect(db)
    kept = conn.execute(f'SELECT length(payload), reason FROM "{DEAD_LETTER_TABLE}" ORDER BY seq').fetchall()
    conn.close()
    assert kept[0][0] == MAX_KEPT_PAYLOAD_BYTES and f"of {MAX_KEPT_PAYLOAD_BYTES * 10} bytes kept" in kept[0][1]
    assert kept[1] == (5, "undecodable message: small")


# -- large rows: fragments (issue 10 case 9) -----------------------------------------------------
def test_large_row_fragments_round_trip_and_each_fits_its_message():
    big = os.urandom(300_000)
    batch = ChangeBatch(origin=4, rows=(RowChange("t", "upsert", (1,), ("id", "v"), (1, big), 9, 4),), primary_keys={"t": ("id",)})
    payloads = codec.fragment_payloads(codec.body_map(batch), 100_000, ALWAYS_COMPRESS)
    assert len(payloads) == 4 and all(len(p) <= 100_000 + codec.FRAGMENT_OVERHEAD for p in payloads)
    fragments = [codec.decode_message(p) for p in payloads]
    assert [(f.origin, f.index, f.count) for f in fragments] == [(4, i, 4) for i in range(4)]
    assert [codec.decode_for_apply(p) for p in payloads] == fragments
    joined = b"".join(f.piece for f in fragments)
    assert_rows_exact(codec.decode_assembled(joined, for_apply=False), batch)
    with pytest.raises(CodecError):
        decode_batch(payloads[0])  # a plain batch reader refuses a fragment (and skips it)


@pytest.mark.parametrize(
    "document",
    [
        {"o": 1, "f": [0, 1, b"x"]},  # a single fragment is not a fragment
        {"o": 1, "f": [2, 2, b"x"]},
        {"o": 1, "f": [0, 2, b""]},
        {"o": 1, "f": [0, 2, "text"]},
        {"o": 1, "f": [0, 2]},
        {"o": "one", "f": [0, 2, b"x"]},
        {"o": 1, "f": [0, codec.MAX_FRAGMENTS + 1, b"x"]},
    ],
)
def test_malformed_fragments_are_refused(document):
    with pytest.raises(CodecError):
        codec.decode_for_apply(body_payload(document))


def test_a_row_beyond_the_limit_cannot_be_fragmented(monkeypatch):
    from marmot_appliance.replication.wire import encode

    batch = ChangeBatch(origin=1, rows=(RowChange("t", "upsert", (1,), ("id", "v"), (1, b"x" * 5000), 9, 1),))
    small = BatchCodec()
    monkeypatch.setattr(encode, "MAX_ROW_BODY_BYTES", 4000)  # where the encoder reads it
    with pytest.raises(CodecError, match="more than the 4000"):
        small.fragment_payloads(codec.body_map(batch), 1024)
