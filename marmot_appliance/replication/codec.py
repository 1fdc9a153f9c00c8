"""The wire codec: one `ChangeBatch` <-> the bytes of one message on a shard stream.

Envelope (documented for other applications in docs/wire-format.md; keep the two in step):

    byte 0   format version (FORMAT_VERSION)
    byte 1   flags: bit 0 set = the rest is one zstd frame; every other bit must be 0
    rest     CBOR body (RFC 8949), possibly zstd-compressed

CBOR body, a map with short text keys (readers ignore keys they do not know):

    "o": origin node id (int)
    "t": tables: [[name, fingerprint | null, [pk column names] | null], ...]
    "g": row groups: [[table index, op ("upsert" | "delete"), [column names], pk | null], ...]
         pk = positions of the primary-key columns inside the column list, or null when the
         primary key is carried per row
    "r": rows in commit order: [group index, version, [values]] with optional trailing
         origin (when it differs from "o") and explicit pk values (when the group has none
         or a row's pk is not the projection of its values)

Grouping rows by (table, op, columns) keeps table and column names out of every row, and rows
keep their batch order (a delete followed by a re-insert of the same key must stay in order).
Values use CBOR's own types, which match SQLite's storage classes one to one: integer, float64
(always 8 bytes, so 0.1 and -0.0 are exact; NaN keeps its payload bits), text, byte string,
null. No tags, no datetime rewriting.

Speed matters (the pipeline targets 100k rows/s on two cores): per-row work is a dict lookup,
one list build and a type check per value; CBOR and zstd run in C with reused contexts.
"""

from __future__ import annotations

import struct
import threading
from array import array
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import cbor2
import zstandard

from marmot_appliance.errors import MarmotError
from marmot_appliance.replication.types import ChangeBatch, RowChange
from marmot_appliance.spec.model import CompressionSettings

MSG_ID_HEADER = "Nats-Msg-Id"
ORIGIN_HEADER = "Marmot-Origin"
# On every message of a publisher's round but the last of its shard: the rows that follow on
# this stream from the same origin belong with these (committed together, or in one read of
# committed rows), so the receiver applies them in the same SQLite transaction.
MORE_HEADER = "Marmot-More"

FORMAT_VERSION = 1
FLAG_ZSTD = 0x01
KNOWN_FLAGS = FLAG_ZSTD

# A decoded body larger than this is refused: a tiny zstd frame can claim gigabytes.
MAX_DECODED_BYTES = 64 * 1024 * 1024
# Deepest legitimate nesting: body map -> rows -> row -> values/pk (4); leave some slack.
MAX_CBOR_DEPTH = 8
# Most CBOR data items (containers, keys and values each count one) in one body. cbor2 builds
# every item as a Python object (up to ~64 bytes each: an empty list), so a body's memory is
# bounded by this times 64 bytes whatever its compression ratio; without it a 2 KB zstd frame
# of nulls or empty arrays became gigabytes of objects. Publishers cut batches to stay below it
# (publisher.py); docs/wire-format.md states it.
MAX_CBOR_ITEMS = 1 << 17
# Rows larger than one message travel as fragments (below): the CBOR body of the row's own
# one-row batch, cut into pieces that each fit a message. Its assembled size is bounded by
# this (64 MiB of values, plus names and keys), and the fragments of one row by MAX_FRAGMENTS.
MAX_ROW_BODY_BYTES = 68 * 1024 * 1024
MAX_FRAGMENTS = 1 << 16
# Envelope and CBOR around a fragment's piece: {"o": origin, "f": [index, count, piece]}.
FRAGMENT_OVERHEAD = 64
# Decompression proceeds in slices of this size, checked as they arrive: a bomb is refused
# after at most MAX_CBOR_ITEMS bytes (plus one slice) were ever decompressed.
_DECOMPRESS_SLICE = 128 * 1024

OPS = ("upsert", "delete")
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_VALUE_TYPES = frozenset((int, float, str, bytes, type(None)))
# cbor2 writes every NaN as the half-float 0xf97e00, dropping its payload bits. When that byte
# sequence shows up in a body (rare: SQLite itself stores NaN as NULL), the batch is re-encoded
# with a float encoder that writes all 8 bytes.
_HALF_NAN = b"\xf9\x7e\x00"
_FIRST = itemgetter(0)


class CodecError(MarmotError):
    """A payload is not a valid change batch, or a batch cannot be encoded."""


def _encode_float_exact(encoder: Any, value: float) -> None:
    encoder.write(b"\xfb" + struct.pack(">d", value))


class BatchCodec:
    """Encoder/decoder holding reusable zstd contexts.

    zstd contexts are not thread-safe, so each thread gets its own (thread-local); one
    BatchCodec may be shared by the event loop and `asyncio.to_thread` workers.
    """

    def __init__(self, max_decoded_bytes: int = MAX_DECODED_BYTES):
        self.max_decoded_bytes = max_decoded_bytes
        self._local = threading.local()

    # -- zstd contexts -------------------------------------------------------------------
    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        compressors = getattr(self._local, "compressors", None)
        if compressors is None:
            compressors = self._local.compressors = {}
        compressor = compressors.get(level)
        if compressor is None:
            compressor = compressors[level] = zstandard.ZstdCompressor(level=level)
        return compressor

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor

    # -- encode --------------------------------------------------------------------------
    def encode(self, batch: ChangeBatch, compression: CompressionSettings | None = None) -> bytes:
        """Bytes for one message. Raises CodecError for values SQLite cannot hold."""
        compression = compression or CompressionSettings()
        try:
            body_map = _body_map(batch)
            body = cbor2.dumps(body_map)
            if _HALF_NAN in body:
                body = cbor2.dumps(body_map, encoders={float: _encode_float_exact})
        except CodecError:
            raise
        except Exception as exc:  # cbor2 raises several types for unencodable values
            raise CodecError(f"cannot encode change batch: {exc}") from exc
        return self._envelope(body, compression)

    # -- decode --------------------------------------------------------------------------
    def decode(self, payload: bytes) -> ChangeBatch:
        """The batch in `payload`. Anything malformed raises CodecError, never another error."""
        try:
            return _batch_from_document(self._document(payload))
        except CodecError:
            raise
        except Exception as exc:  # a bug guard: callers rely on CodecError only
            raise CodecError(f"malformed change batch: {type(exc).__name__}: {exc}") from exc

    def decode_for_apply(self, payload: bytes) -> "ChangeBatch | GroupedBatch":
        """Like decode(), but a well-formed batch comes back as a GroupedBatch (no per-row objects).

        Only the common shape takes the fast path (every group derives its keys from its values,
        no row carries an explicit key); anything else, malformed input included, goes through
        decode() and gives exactly its result or its CodecError.
        """
        try:
            document = self._document(payload)
        except CodecError:
            raise
        except Exception as exc:  # a bug guard: callers rely on CodecError only
            raise CodecError(f"malformed change batch: {type(exc).__name__}: {exc}") from exc
        if _is_fragment(document):
            return _fragment_from_document(document)
        try:
            grouped = _grouped_from_document(document)
        except Exception:  # noqa: BLE001 - the strict decoder names the problem precisely
            grouped = None
        if grouped is not None:
            return grouped
        # The fast path may have appended to the row lists before it gave up: parse again.
        return self.decode(payload)

    def decode_message(self, payload: bytes) -> "ChangeBatch | Fragment":
        """decode(), except that a fragment of a large row comes back as a Fragment (the feed)."""
        try:
            document = self._document(payload)
            if _is_fragment(document):
                return _fragment_from_document(document)
            return _batch_from_document(document)
        except CodecError:
            raise
        except Exception as exc:  # a bug guard: callers rely on CodecError only
            raise CodecError(f"malformed change batch: {type(exc).__name__}: {exc}") from exc

    def decode_assembled(self, body: bytes, *, for_apply: bool = True) -> "ChangeBatch | GroupedBatch":
        """The batch in the reassembled pieces of a large row's fragments (a bare CBOR body)."""
        try:
            if len(body) > MAX_ROW_BODY_BYTES:
                raise CodecError(f"a large row's body of {len(body)} bytes exceeds {MAX_ROW_BODY_BYTES}")
            if len(body) > MAX_CBOR_ITEMS:
                check = StructureCheck()
                check.feed(body)
                check.finish(body)
            try:
                document = cbor2.loads(body, max_depth=MAX_CBOR_DEPTH, allow_duplicate_keys=False)
            except Exception as exc:  # cbor2 raises value, type, overflow and memory errors
                raise CodecError(f"malformed CBOR body: {exc}") from exc
            if _is_fragment(document):
                raise _fail("a large row's body is itself a fragment")
            if for_apply:
                grouped = None
                try:
                    grouped = _grouped_from_document(document)
                except Exception:  # noqa: BLE001 - the strict decoder below names the problem
                    pass
                if grouped is not None:
                    return grouped
                document = cbor2.loads(body, max_depth=MAX_CBOR_DEPTH, allow_duplicate_keys=False)
            return _batch_from_document(document)
        except CodecError:
            raise
        except Exception as exc:  # a bug guard: callers rely on CodecError only
            raise CodecError(f"malformed large row: {type(exc).__name__}: {exc}") from exc

    def fragment_payloads(
        self, body_map: dict[str, Any], piece_bytes: int, compression: CompressionSettings | None = None
    ) -> list[bytes]:
        """The messages carrying one large row's body (docs/wire-format.md, "Large rows").

        Each piece holds at most `piece_bytes` of the body before compression, so a message
        fits the server's max_payload even when the row does not compress. Raises CodecError
        for a body beyond MAX_ROW_BODY_BYTES (the publisher dead-letters that row).
        """
        compression = compression or CompressionSettings()
        body = self._cbor(body_map)
        if len(body) > MAX_ROW_BODY_BYTES:
            raise CodecError(
                f"the row encodes to {len(body)} bytes, more than the {MAX_ROW_BODY_BYTES} a large row may have"
            )
        piece_bytes = max(1024, piece_bytes)
        count = -(-len(body) // piece_bytes)
        if count > MAX_FRAGMENTS:
            raise CodecError(f"the row would need {count} fragments, more than {MAX_FRAGMENTS}")
        origin = body_map["o"]
        return [
            self._envelope(cbor2.dumps({"o": origin, "f": [index, count, body[index * piece_bytes : (index + 1) * piece_bytes]]}), compression)
            for index in range(count)
        ]

    @staticmethod
    def _cbor(body_map: dict[str, Any]) -> bytes:
        try:
            body = cbor2.dumps(body_map)
            if _HALF_NAN in body:
                body = cbor2.dumps(body_map, encoders={float: _encode_float_exact})
        except Exception as exc:  # cbor2 raises several types for unencodable values
            raise CodecError(f"cannot encode change batch: {exc}") from exc
        return body

    def encode_body(self, body_map: dict[str, Any], compression: CompressionSettings | None = None) -> bytes:
        """Envelope + CBOR of an already built body map (the publisher's fast path)."""
        compression = compression or CompressionSettings()
        try:
            body = cbor2.dumps(body_map)
            if _HALF_NAN in body:
                body = cbor2.dumps(body_map, encoders={float: _encode_float_exact})
        except Exception as exc:  # cbor2 raises several types for unencodable values
            raise CodecError(f"cannot encode change batch: {exc}") from exc
        return self._envelope(body, compression)

    def _envelope(self, body: bytes, compression: CompressionSettings) -> bytes:
        if compression.level > 0 and len(body) >= compression.min_bytes:
            compressed = self._compressor(compression.level).compress(body)
            # Only worth it when it saves bytes; receivers then skip decompression too.
            if len(compressed) < len(body):
                return bytes((FORMAT_VERSION, FLAG_ZSTD)) + compressed
        return bytes((FORMAT_VERSION, 0)) + body

    def _document(self, payload: bytes) -> Any:
        """The CBOR document of a payload, its size and shape bounded before any object is built."""
        body = self._body_bytes(payload)
        try:
            return cbor2.loads(body, max_depth=MAX_CBOR_DEPTH, allow_duplicate_keys=False)
        except Exception as exc:  # cbor2 raises value, type, overflow and memory errors
            raise CodecError(f"malformed CBOR body: {exc}") from exc

    def body(self, payload: bytes) -> bytes:
        """The checked CBOR body of a payload (envelope, size, item count, nesting), undecoded."""
        return self._body_bytes(payload)

    def _body_bytes(self, payload: bytes) -> bytes:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise CodecError(f"payload must be bytes, not {type(payload).__name__}")
        payload = bytes(payload)
        if len(payload) < 2:
            raise CodecError(f"payload too short ({len(payload)} bytes) for the envelope")
        version, flags = payload[0], payload[1]
        if version != FORMAT_VERSION:
            raise CodecError(
                f"unsupported wire format version {version} (this build reads {FORMAT_VERSION})"
            )
        if flags & ~KNOWN_FLAGS:
            raise CodecError(f"unknown envelope flags 0x{flags:02x}")
        body = payload[2:]
        if not flags & FLAG_ZSTD:
            if len(body) > self.max_decoded_bytes:
                raise CodecError(f"body of {len(body)} bytes exceeds {self.max_decoded_bytes}")
            if len(body) > MAX_CBOR_ITEMS:  # a shorter body cannot hold more items than bytes
                check = StructureCheck()
                check.feed(body)
                check.finish(body)
            return body
        return self._decompress(body)

    def _decompress(self, frame: bytes) -> bytes:
        """The frame's content, decompressed slice by slice and checked as it arrives."""
        limit = self.max_decoded_bytes
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise CodecError(f"bad zstd frame: {exc}") from exc
        if declared < 0:
            raise CodecError("zstd frame does not declare its content size")
        if declared > limit:
            raise CodecError(f"compressed body declares {declared} bytes, limit is {limit}")
        try:
            if declared <= MAX_CBOR_ITEMS:  # too short to hold too many items: no need to count
                return self._decompressor().decompress(frame, allow_extra_data=False)
            check = StructureCheck()
            body = bytearray()
            reader = self._decompressor().stream_reader(frame, read_across_frames=True)
            while True:
                piece = reader.read(_DECOMPRESS_SLICE)
                if not piece:
                    break
                body += piece
                if len(body) > declared:
                    raise CodecError(f"zstd frame holds more than the {declared} bytes it declares")
                check.feed(body)
            if len(body) != declared:
                raise CodecError(f"zstd frame holds {len(body)} bytes, it declares {declared}")
            check.finish(body)
            return bytes(body)
        except zstandard.ZstdError as exc:
            raise CodecError(f"bad zstd frame: {exc}") from exc


class StructureCheck:
    """Walks CBOR item headers without building anything: counts items, bounds nesting.

    Resumable: feed() takes the whole buffer so far each time (it grows as slices are
    decompressed) and goes as far as complete headers allow; finish() demands exactly one
    complete top-level item. Refuses what change batches never contain, before cbor2 could
    build it: tags, indefinite lengths, simple values other than false/true/null.
    """

    __slots__ = ("pos", "stack", "items", "max_items", "max_depth")

    def __init__(self, max_items: int = MAX_CBOR_ITEMS, max_depth: int = MAX_CBOR_DEPTH):
        self.pos = 0
        self.stack = [1]  # items still expected per open container; the root expects one
        self.items = 0
        self.max_items = max_items
        self.max_depth = max_depth

    def feed(self, data: bytes | bytearray) -> None:
        pos, stack, items, max_items = self.pos, self.stack, self.items, self.max_items
        end = len(data)
        try:
            while stack:
                if stack[-1] == 0:
                    stack.pop()
                    continue
                if pos >= end:
                    break
                initial = data[pos]
                major = initial >> 5
                info = initial & 0x1F
                if info < 24:
                    argument, size = info, 1
                elif info < 28:
                    size = 1 + (1 << (info - 24))
                    if pos + size > end:
                        break
                    argument = int.from_bytes(data[pos + 1 : pos + size], "big")
                else:
                    raise CodecError(f"CBOR item at byte {pos}: indefinite or reserved length (0x{initial:02x})")
                stack[-1] -= 1
                items += 1
                pos += size
                if major <= 1:
                    continue
                if major <= 3:
                    pos += argument
                    continue
                if major <= 5:
                    count = argument if major == 4 else 2 * argument
                    if items + count > max_items:
                        raise CodecError(f"CBOR body holds more than {max_items} items")
                    if count:
                        if len(stack) > self.max_depth:
                            raise CodecError(f"CBOR body nests deeper than {self.max_depth}")
                        stack.append(count)
                    continue
                if major == 6:
                    raise CodecError(f"CBOR tag {argument} at byte {pos - size}: change batches carry no tags")
                if not (20 <= info <= 22 or 25 <= info <= 27):
                    raise CodecError(f"CBOR simple value 0x{initial:02x} at byte {pos - size} is not allowed")
        finally:
            self.pos, self.items = pos, items

    def finish(self, data: bytes | bytearray) -> None:
        if self.stack or self.pos != len(data):
            if self.pos < len(data) and not self.stack:
                raise CodecError(f"{len(data) - self.pos} bytes after the CBOR body")
            raise CodecError("CBOR body is truncated")


def _body_map(batch: ChangeBatch) -> dict[str, Any]:
    table_index: dict[str, int] = {}
    tables: list[list[Any]] = []

    def table_slot(name: str) -> int:
        index = table_index.get(name)
        if index is None:
            if type(name) is not str:
                raise CodecError(f"table name must be text, not {type(name).__name__}")
            index = table_index[name] = len(tables)
            pk_names = batch.primary_keys.get(name)
            tables.append([name, batch.fingerprints.get(name), list(pk_names) if pk_names is not None else None])
        return index

    for name in batch.fingerprints:
        table_slot(name)
    for name in batch.primary_keys:
        table_slot(name)

    origin = batch.origin
    # (table, op, columns) -> (group index, pk positions or None)
    group_index: dict[tuple, tuple[int, tuple[int, ...] | None]] = {}
    groups: list[list[Any]] = []
    rows: list[list[Any]] = []
    append = rows.append
    for row in batch.rows:
        columns = row.columns
        key = (row.table, row.op, columns)
        slot = group_index.get(key)
        if slot is None:
            slot = group_index[key] = _new_group(row, table_slot(row.table), batch, groups)
        group, positions = slot
        values = row.values
        if len(values) != len(columns):
            raise CodecError(
                f"row for {row.table!r} has {len(values)} values for {len(columns)} columns"
            )
        if positions is not None and _pk_is_projection(row.pk, values, positions):
            if row.origin == origin:
                append([group, row.version, values])
            else:
                append([group, row.version, values, row.origin])
        else:
            append([group, row.version, values, row.origin, row.pk])
    return {"o": origin, "t": tables, "g": groups, "r": rows}


def _new_group(row: RowChange, table: int, batch: ChangeBatch, groups: list) -> tuple[int, tuple[int, ...] | None]:
    if row.op not in OPS:
        raise CodecError(f"unknown operation {row.op!r} (expected one of {', '.join(OPS)})")
    for column in row.columns:
        if type(column) is not str:
            raise CodecError(f"column names must be text, not {type(column).__name__}")
    positions: tuple[int, ...] | None = None
    pk_names = batch.primary_keys.get(row.table)
    if pk_names and all(name in row.columns for name in pk_names):
        positions = tuple(row.columns.index(name) for name in pk_names)
    groups.append([table, row.op, list(row.columns), list(positions) if positions is not None else None])
    return len(groups) - 1, positions


def _pk_is_projection(pk: tuple, values: tuple, positions: tuple[int, ...]) -> bool:
    """True when pk can be rebuilt from values exactly (same objects, or equal non-floats)."""
    if len(pk) != len(positions):
        return False
    for key_value, position in zip(pk, positions):
        value = values[position]
        if key_value is value:
            continue
        # Equal-but-distinct floats may still differ in bits (0.0 vs -0.0, NaN payloads).
        if type(key_value) is not type(value) or type(value) is float or key_value != value:
            return False
    return True


# -- decoding the CBOR document ------------------------------------------------------------
def _row_factory():
    """The fastest correct way to build a RowChange.

    A frozen dataclass's __init__ sets each field through object.__setattr__ (about 1.4 us for
    seven fields); filling __dict__ directly builds the identical object in about half that,
    which matters at 100k+ rows/s. Falls back to the constructor if RowChange ever gets slots.
    """
    if "__slots__" in RowChange.__dict__:
        return RowChange
    new = object.__new__

    def make(table, op, pk, columns, values, version, origin):
        row = new(RowChange)
        row.__dict__.update(
            table=table, op=op, pk=pk, columns=columns, values=values, version=version, origin=origin
        )
        return row

    return make


_make_row = _row_factory()


def _fail(message: str) -> CodecError:
    return CodecError(f"malformed change batch: {message}")


def _check_int64(value: Any, what: str) -> int:
    if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
        raise _fail(f"{what} must be a 64-bit integer, got {value!r:.80}")
    return value


def _check_values(values: Any, width: int, what: str) -> tuple:
    if type(values) is not list or len(values) != width:
        raise _fail(f"{what} must be a list of {width} values")
    for value in values:
        kind = type(value)
        if kind is int:
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise _fail(f"{what}: integer {value} outside SQLite's 64-bit range")
        elif kind not in _VALUE_TYPES:
            raise _fail(f"{what}: {kind.__name__} is not a SQLite storage class")
    return tuple(values)


def _batch_from_document(document: Any) -> ChangeBatch:
    origin, fingerprints, primary_keys, groups, raw_rows = _header_from_document(document)
    if type(raw_rows) is not list:
        raise _fail("'r' must be a list")
    rows: list[RowChange] = []
    append = rows.append
    group_count = len(groups)
    for number, entry in enumerate(raw_rows):
        if type(entry) is not list or not 3 <= len(entry) <= 5:
            raise _fail(f"row {number} must be [group, version, values, origin?, pk?]")
        group = entry[0]
        if type(group) is not int or not 0 <= group < group_count:
            raise _fail(f"row {number} refers to unknown group {group!r:.40}")
        table, op, columns, positions = groups[group]
        version = entry[1]
        if type(version) is not int or not _INT64_MIN <= version <= _INT64_MAX:
            raise _fail(f"row {number}: version must be a 64-bit integer")
        values = _check_values(entry[2], len(columns), f"row {number}")
        row_origin = origin if len(entry) < 4 else _check_int64(entry[3], f"row {number} origin")
        if len(entry) == 5:
            pk_values = entry[4]
            if type(pk_values) is not list:
                raise _fail(f"row {number}: pk must be a list")
            pk = _check_values(pk_values, len(pk_values), f"row {number} pk")
        elif positions is None:
            raise _fail(f"row {number}: no pk and its group has no pk positions")
        else:
            pk = tuple([values[p] for p in positions])
        append(_make_row(table, op, pk, columns, values, version, row_origin))
    return ChangeBatch(origin=origin, rows=tuple(rows), fingerprints=fingerprints, primary_keys=primary_keys)


def _header_from_document(document: Any) -> tuple[int, dict, dict, list, Any]:
    """Checked origin, fingerprints, primary keys and groups of a body, and its raw rows."""
    if type(document) is not dict:
        raise _fail("body is not a CBOR map")
    try:
        origin, raw_tables, raw_groups, raw_rows = document["o"], document["t"], document["g"], document["r"]
    except KeyError as exc:
        raise _fail(f"body lacks key {exc.args[0]!r}") from None
    origin = _check_int64(origin, "origin")

    fingerprints: dict[str, str] = {}
    primary_keys: dict[str, tuple[str, ...]] = {}
    table_names: list[str] = []
    seen_tables: set[str] = set()
    if type(raw_tables) is not list:
        raise _fail("'t' must be a list")
    for entry in raw_tables:
        if type(entry) is not list or len(entry) != 3:
            raise _fail("each table entry must be [name, fingerprint, pk columns]")
        name, fingerprint, pk_names = entry
        if type(name) is not str:
            raise _fail("table name must be text")
        if name in seen_tables:
            raise _fail(f"table {name!r:.80} listed twice")
        seen_tables.add(name)
        if fingerprint is not None:
            if type(fingerprint) is not str:
                raise _fail(f"fingerprint of {name!r} must be text or null")
            fingerprints[name] = fingerprint
        if pk_names is not None:
            if type(pk_names) is not list or any(type(c) is not str for c in pk_names):
                raise _fail(f"primary key of {name!r} must be a list of column names")
            primary_keys[name] = tuple(pk_names)
        table_names.append(name)

    # group -> (table, op, columns, pk positions or None)
    groups: list[tuple[str, str, tuple[str, ...], tuple[int, ...] | None]] = []
    if type(raw_groups) is not list:
        raise _fail("'g' must be a list")
    for entry in raw_groups:
        if type(entry) is not list or len(entry) != 4:
            raise _fail("each group must be [table index, op, columns, pk positions]")
        table, op, columns, positions = entry
        if type(table) is not int or not 0 <= table < len(table_names):
            raise _fail(f"group refers to unknown table index {table!r:.40}")
        if op not in OPS or type(op) is not str:
            raise _fail(f"unknown operation {op!r:.40}")
        if type(columns) is not list or any(type(c) is not str for c in columns):
            raise _fail("group columns must be a list of column names")
        if positions is not None:
            if type(positions) is not list or any(
                type(p) is not int or not 0 <= p < len(columns) for p in positions
            ):
                raise _fail("group pk positions must index its columns")
            positions = tuple(positions)
        groups.append((table_names[table], op, tuple(columns), positions))
    return origin, fingerprints, primary_keys, groups, raw_rows


# -- the grouped (fast) decoding ------------------------------------------------------------
@dataclass
class RowGroup:
    """Rows of one (table, op, columns) shape, ready for executemany.

    Each entry of `params` is one row as a list: its values in `columns` order, then its
    version, then its origin. Statements address them by number (?1 .. ?n+2), so the same
    lists feed both the versions upsert and the row upsert without any copying.
    """

    table: str
    op: str
    columns: tuple[str, ...]
    pk_positions: tuple[int, ...]
    params: list[list[Any]]

    def row_changes(self) -> list[RowChange]:
        """The rows as RowChange objects (slow; for rare paths such as parking)."""
        width = len(self.columns)
        positions = self.pk_positions
        out = []
        for entry in self.params:
            values = tuple(entry[:width])
            pk = tuple([values[p] for p in positions])
            out.append(_make_row(self.table, self.op, pk, self.columns, values, entry[width], entry[width + 1]))
        return out


@dataclass
class GroupedBatch:
    """A decoded change batch as row groups (what the applier consumes fastest).

    Row order across groups is not kept: the applier's outcome does not depend on it (the
    highest version of a key wins, whatever order rows arrive in). to_change_batch() gives the
    rows back as RowChange objects, grouped.
    """

    origin: int
    groups: list[RowGroup]
    fingerprints: dict[str, str] = field(default_factory=dict)
    primary_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    row_count: int = 0

    @property
    def rows(self) -> tuple[RowChange, ...]:
        return self.to_change_batch().rows

    def to_change_batch(self) -> ChangeBatch:
        rows: list[RowChange] = []
        for group in self.groups:
            rows.extend(group.row_changes())
        return ChangeBatch(self.origin, tuple(rows), dict(self.fingerprints), dict(self.primary_keys))


_ALLOWED_VALUE_TYPES = _VALUE_TYPES


def _int64_column(column: tuple, kinds: set) -> bool:
    """True when every int in a column fits SQLite's 64-bit INTEGER (array('q') checks in C)."""
    if int not in kinds:
        return True
    try:
        array("q", column if len(kinds) == 1 else [v for v in column if type(v) is int])
    except OverflowError:
        return False
    return True


def _grouped_from_document(document: Any) -> GroupedBatch | None:
    """The batch as row groups, or None when it is not of the common well-formed shape.

    Every check of the strict decoder holds for what this accepts (types of values, 64-bit
    integers, widths, group indexes), but done per column in C (set/map/zip/array) instead of
    per value in Python. Appends version and origin to the decoded value lists in place.
    """
    origin, fingerprints, primary_keys, groups, raw_rows = _header_from_document(document)
    if type(raw_rows) is not list:
        return None
    if not raw_rows:
        return GroupedBatch(origin, [], fingerprints, primary_keys, 0)
    if set(map(type, raw_rows)) != {list}:
        return None
    lengths = set(map(len, raw_rows))
    if not lengths <= {3, 4}:
        return None  # explicit per-row keys (or garbage): the strict path
    if set(map(type, map(_FIRST, raw_rows))) != {int}:  # by type: a set would fold True into 1
        return None
    group_ids = set(map(_FIRST, raw_rows))
    if min(group_ids) < 0 or max(group_ids) >= len(groups):
        return None
    for index in group_ids:
        if groups[index][3] is None:
            return None  # the group's rows carry their keys explicitly
    buckets: list[list[list[Any]]] = [[] for _ in groups]
    if lengths == {3}:
        if len(group_ids) == 1:
            params = buckets[next(iter(group_ids))]
            append = params.append
            for _group, version, values in raw_rows:
                values.append(version)
                values.append(origin)
                append(values)
        else:
            for group, version, values in raw_rows:
                values.append(version)
                values.append(origin)
                buckets[group].append(values)
    else:
        for entry in raw_rows:
            values = entry[2]
            values.append(entry[1])
            values.append(entry[3] if len(entry) == 4 else origin)
            buckets[entry[0]].append(values)
    out: list[RowGroup] = []
    for index, params in enumerate(buckets):
        if not params:
            continue
        table, op, columns, positions = groups[index]
        width = len(columns) + 2
        if set(map(type, params)) != {list} or set(map(len, params)) != {width}:
            return None  # values were not a list, or of the wrong width
        for position, column in enumerate(zip(*params)):
            kinds = set(map(type, column))
            if position >= width - 2:  # version, origin: integers only
                if kinds != {int}:
                    return None
            elif not kinds <= _ALLOWED_VALUE_TYPES:
                return None
            if not _int64_column(column, kinds):
                return None
        out.append(RowGroup(table, op, columns, positions, params))
    return GroupedBatch(origin, out, fingerprints, primary_keys, len(raw_rows))


@dataclass(frozen=True)
class Fragment:
    """One piece of a large row: part `index` (0-based) of `count` of the CBOR body of the
    row's own one-row batch. The pieces of a row are consecutive messages of one run on its
    shard stream; receivers join them in order and decode the result (decode_assembled)."""

    origin: int
    index: int
    count: int
    piece: bytes


def _is_fragment(document: Any) -> bool:
    return type(document) is dict and "f" in document


def _fragment_from_document(document: dict) -> Fragment:
    origin = _check_int64(document.get("o"), "origin")
    entry = document["f"]
    if type(entry) is not list or len(entry) != 3:
        raise _fail("a fragment must be [index, count, piece]")
    index, count, piece = entry
    if type(count) is not int or not 2 <= count <= MAX_FRAGMENTS:
        raise _fail(f"fragment count must be 2..{MAX_FRAGMENTS}, got {count!r:.40}")
    if type(index) is not int or not 0 <= index < count:
        raise _fail(f"fragment index {index!r:.40} outside 0..{count - 1}")
    if type(piece) is not bytes or not piece:
        raise _fail("a fragment's piece must be a non-empty byte string")
    return Fragment(origin, index, count, piece)


_shared_codec = BatchCodec()


def decode_message(payload: bytes) -> ChangeBatch | Fragment:
    """decode_batch, but a fragment of a large row comes back as a Fragment."""
    return _shared_codec.decode_message(payload)


def decode_assembled(body: bytes, *, for_apply: bool = True) -> ChangeBatch | GroupedBatch:
    """The batch of a large row from its joined fragment pieces (see BatchCodec)."""
    return _shared_codec.decode_assembled(body, for_apply=for_apply)


def fragment_payloads(body_map: dict[str, Any], piece_bytes: int, compression: CompressionSettings | None = None) -> list[bytes]:
    """The messages carrying one large row (see BatchCodec.fragment_payloads)."""
    return _shared_codec.fragment_payloads(body_map, piece_bytes, compression)


def body_map(batch: ChangeBatch) -> dict[str, Any]:
    """The CBOR body map of a batch (what encode() serialises)."""
    return _body_map(batch)


def encode_batch(batch: ChangeBatch, compression: CompressionSettings | None = None) -> bytes:
    """Encode with the module's shared codec (thread-safe; contexts are per thread)."""
    return _shared_codec.encode(batch, compression)


def decode_for_apply(payload: bytes) -> ChangeBatch | GroupedBatch:
    """decode_batch, but the common shape comes back as a GroupedBatch (see BatchCodec)."""
    return _shared_codec.decode_for_apply(payload)


def encode_body(body_map: dict[str, Any], compression: CompressionSettings | None = None) -> bytes:
    """Envelope an already built body map (see BatchCodec.encode_body)."""
    return _shared_codec.encode_body(body_map, compression)


def decode_batch(payload: bytes) -> ChangeBatch:
    """Decode with the module's shared codec; raises CodecError on anything malformed."""
    return _shared_codec.decode(payload)


def uncompressed_size(payload: bytes) -> int:
    """Envelope size before compression, without decompressing (zstd frames declare it).

    Never raises: it only sizes runs of messages, and a frame it cannot read (or a size beyond
    the decoder's limit) counts as its own length; decoding that message later refuses it and
    the consumer dead-letters it. (A raw ZstdError here once stalled a shard forever.)
    """
    if len(payload) > 2 and payload[1] & FLAG_ZSTD:
        try:
            declared = zstandard.frame_content_size(payload[2:])
        except zstandard.ZstdError:
            return len(payload)
        if 0 <= declared <= MAX_DECODED_BYTES:
            return declared + 2
    return len(payload)
