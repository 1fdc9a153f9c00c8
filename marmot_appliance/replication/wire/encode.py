"""Building message bodies: the one place that writes the wire (docs/wire-format.md).

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

Two builders give the same body for the same rows: `body_map` from a ChangeBatch of RowChange
objects (republishing, tests), and `log_rows_body` straight from raw log rows (the publisher's
hot path: no per-row objects; per row one tuple and a getter call). tests/test_wire_golden.py
holds them to the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import cbor2

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.types import ChangeBatch, RowChange
from marmot_appliance.replication.wire.envelope import (
    MAX_FRAGMENTS,
    MAX_ROW_BODY_BYTES,
    ZstdContexts,
    wrap,
)
from marmot_appliance.replication.wire.errors import CodecError
from marmot_appliance.spec.model import CompressionSettings

if TYPE_CHECKING:  # change_log reads SQLite; the wire format only needs the layout's shape
    from marmot_appliance.replication.change_log import LogLayout

BodyMap = dict[str, Any]
# A raw log row as capture.read_pending_rows returns it: (id, layout id, op, c0, c1, ...).
LogRow = tuple[Any, ...]

OPS = ("upsert", "delete")
# cbor2 writes every NaN as the half-float 0xf97e00, dropping its payload bits. When that byte
# sequence shows up in a body (rare: SQLite itself stores NaN as NULL), the batch is re-encoded
# with a float encoder that writes all 8 bytes.
_HALF_NAN = b"\xf9\x7e\x00"
_LAYOUT_AND_OP = itemgetter(1, 2)


def _encode_float_exact(encoder: Any, value: float) -> None:
    encoder.write(b"\xfb" + struct.pack(">d", value))


def cbor_body(body: BodyMap) -> bytes:
    """The CBOR of a body map, floats exact. Raises CodecError for what CBOR cannot hold."""
    try:
        encoded: bytes = cbor2.dumps(body)
        if _HALF_NAN in encoded:
            encoded = cbor2.dumps(body, encoders={float: _encode_float_exact})
    except Exception as exc:  # cbor2 raises several types for unencodable values
        raise CodecError(f"cannot encode change batch: {exc}") from exc
    return encoded


# -- from RowChange objects ------------------------------------------------------------------
def body_map(batch: ChangeBatch) -> BodyMap:
    """The CBOR body map of a batch (what encode() serialises)."""
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
    group_index: dict[tuple[str, str, tuple[str, ...]], tuple[int, tuple[int, ...] | None]] = {}
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
            raise CodecError(f"row for {row.table!r} has {len(values)} values for {len(columns)} columns")
        if positions is not None and _pk_is_projection(row.pk, values, positions):
            if row.origin == origin:
                append([group, row.version, values])
            else:
                append([group, row.version, values, row.origin])
        else:
            append([group, row.version, values, row.origin, row.pk])
    return {"o": origin, "t": tables, "g": groups, "r": rows}


def _new_group(
    row: RowChange, table: int, batch: ChangeBatch, groups: list[list[Any]]
) -> tuple[int, tuple[int, ...] | None]:
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


def _pk_is_projection(pk: tuple[Any, ...], values: tuple[Any, ...], positions: tuple[int, ...]) -> bool:
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


# -- from raw log rows (the publisher) -------------------------------------------------------
def _tuple_getter(indexes: list[int]) -> Callable[[LogRow], Any]:
    """A getter returning a tuple of the given positions (a slice when they are consecutive)."""
    if indexes == list(range(indexes[0], indexes[0] + len(indexes))):
        return itemgetter(slice(indexes[0], indexes[0] + len(indexes)))
    return itemgetter(*indexes)


def log_rows_body(origin: int, chunk: Sequence[LogRow], layouts: Mapping[int, LogLayout]) -> BodyMap:
    """The body of raw log rows, exactly as body_map() builds it for the same rows as objects.

    Each table's fingerprint and key come from the layout its rows were captured with (rows
    outlive schema changes in the log); when one chunk holds rows of two layouts of a table,
    the table entry carries the last one's fingerprint, as body_map() does.
    """
    tables: list[list[Any]] = []
    table_slot: dict[str, int] = {}
    groups: list[list[Any]] = []
    # (layout id, op) -> (group, values getter)
    slots: dict[tuple[int, int], tuple[int, Callable[[LogRow], Any]]] = {}
    for layout_id, op in dict.fromkeys(map(_LAYOUT_AND_OP, chunk)):  # first-appearance order
        layout = layouts[layout_id]
        index = table_slot.get(layout.table)
        if index is None:
            index = table_slot[layout.table] = len(tables)
            tables.append([layout.table, layout.fingerprint, list(layout.primary_key)])
        else:
            tables[index][1] = layout.fingerprint
        getter: Callable[[LogRow], Any]
        if op == bk.OP_UPSERT:
            groups.append([index, "upsert", list(layout.columns), list(layout.pk_indexes)])
            getter = itemgetter(slice(3, 3 + len(layout.columns)))
        else:
            groups.append([index, "delete", list(layout.primary_key), list(range(len(layout.primary_key)))])
            getter = _tuple_getter([3 + i for i in layout.pk_indexes])
        slots[(layout_id, op)] = (len(groups) - 1, getter)
    entries: list[tuple[int, int, Any]]
    if len(slots) == 1:
        ((group, getter),) = slots.values()
        entries = [(group, row[0], getter(row)) for row in chunk]
    else:
        entries = []
        append = entries.append
        for row in chunk:
            group, getter = slots[row[1], row[2]]
            append((group, row[0], getter(row)))
    return {"o": origin, "t": tables, "g": groups, "r": entries}


# -- bodies into messages --------------------------------------------------------------------
class Encoder:
    """Bodies into messages, with this instance's zstd contexts (thread-safe: per thread)."""

    def __init__(self) -> None:
        self.contexts = ZstdContexts()

    def encode(self, batch: ChangeBatch, compression: CompressionSettings | None = None) -> bytes:
        """Bytes for one message. Raises CodecError for values SQLite cannot hold."""
        try:
            body = body_map(batch)
        except CodecError:
            raise
        except Exception as exc:  # a malformed batch object: callers rely on CodecError only
            raise CodecError(f"cannot encode change batch: {exc}") from exc
        return self.encode_body(body, compression)

    def encode_body(self, body: BodyMap, compression: CompressionSettings | None = None) -> bytes:
        """Envelope + CBOR of an already built body map."""
        return wrap(cbor_body(body), compression or CompressionSettings(), self.contexts)

    def fragment_payloads(
        self, body: BodyMap, piece_bytes: int, compression: CompressionSettings | None = None
    ) -> list[bytes]:
        """The messages carrying one large row's body (docs/wire-format.md, "Large rows").

        Each piece holds at most `piece_bytes` of the body before compression, so a message
        fits the server's max_payload even when the row does not compress. Raises CodecError
        for a body beyond MAX_ROW_BODY_BYTES (the publisher dead-letters that row).
        """
        compression = compression or CompressionSettings()
        encoded = cbor_body(body)
        if len(encoded) > MAX_ROW_BODY_BYTES:
            raise CodecError(
                f"the row encodes to {len(encoded)} bytes, more than the {MAX_ROW_BODY_BYTES} a large row may have"
            )
        piece_bytes = max(1024, piece_bytes)
        count = -(-len(encoded) // piece_bytes)
        if count > MAX_FRAGMENTS:
            raise CodecError(f"the row would need {count} fragments, more than {MAX_FRAGMENTS}")
        origin = body["o"]
        return [
            wrap(
                cbor2.dumps({"o": origin, "f": [index, count, encoded[index * piece_bytes : (index + 1) * piece_bytes]]}),
                compression,
                self.contexts,
            )
            for index in range(count)
        ]


_shared = Encoder()


def encode_batch(batch: ChangeBatch, compression: CompressionSettings | None = None) -> bytes:
    """Encode with the module's shared encoder (thread-safe; contexts are per thread)."""
    return _shared.encode(batch, compression)


def encode_body(body: BodyMap, compression: CompressionSettings | None = None) -> bytes:
    """Envelope an already built body map (the publisher's path, after log_rows_body)."""
    return _shared.encode_body(body, compression)


def fragment_payloads(body: BodyMap, piece_bytes: int, compression: CompressionSettings | None = None) -> list[bytes]:
    """The messages carrying one large row (see Encoder.fragment_payloads)."""
    return _shared.fragment_payloads(body, piece_bytes, compression)
