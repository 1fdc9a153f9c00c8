"""Reading a decoded CBOR document into a ChangeBatch or a Fragment, checking every part.

The strict reader: every table, group, row and value is checked (types, 64-bit integers,
widths, indexes), and anything off raises CodecError naming the problem. The grouped reader
(grouped.py) accepts a subset of what this accepts, faster; both share the header parsing here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from marmot_appliance.replication.types import ChangeBatch, RowChange
from marmot_appliance.replication.wire.envelope import MAX_FRAGMENTS
from marmot_appliance.replication.wire.errors import malformed as _fail

OPS = ("upsert", "delete")
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
VALUE_TYPES = frozenset((int, float, str, bytes, type(None)))
# group -> (table, op, columns, pk positions or None)
Group = tuple[str, str, tuple[str, ...], tuple[int, ...] | None]
Header = tuple[int, dict[str, str], dict[str, tuple[str, ...]], list[Group], Any]


def _row_factory() -> Callable[..., RowChange]:
    """The fastest correct way to build a RowChange.

    A frozen dataclass's __init__ sets each field through object.__setattr__ (about 1.4 us for
    seven fields); filling __dict__ directly builds the identical object in about half that,
    which matters at 100k+ rows/s. Falls back to the constructor if RowChange ever gets slots.
    """
    if "__slots__" in RowChange.__dict__:
        return RowChange
    new = object.__new__

    def make(
        table: str, op: str, pk: tuple[Any, ...], columns: tuple[str, ...], values: tuple[Any, ...], version: int, origin: int
    ) -> RowChange:
        row: RowChange = new(RowChange)
        row.__dict__.update(
            table=table, op=op, pk=pk, columns=columns, values=values, version=version, origin=origin
        )
        return row

    return make


make_row = _row_factory()



def check_int64(value: Any, what: str) -> int:
    if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
        raise _fail(f"{what} must be a 64-bit integer, got {value!r:.80}")
    return value


def check_values(values: Any, width: int, what: str) -> tuple[Any, ...]:
    if type(values) is not list or len(values) != width:
        raise _fail(f"{what} must be a list of {width} values")
    for value in values:
        kind = type(value)
        if kind is int:
            if not INT64_MIN <= value <= INT64_MAX:
                raise _fail(f"{what}: integer {value} outside SQLite's 64-bit range")
        elif kind not in VALUE_TYPES:
            raise _fail(f"{what}: {kind.__name__} is not a SQLite storage class")
    return tuple(values)


def batch_from_document(document: Any) -> ChangeBatch:
    origin, fingerprints, primary_keys, groups, raw_rows = header_from_document(document)
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
        if type(version) is not int or not INT64_MIN <= version <= INT64_MAX:
            raise _fail(f"row {number}: version must be a 64-bit integer")
        values = check_values(entry[2], len(columns), f"row {number}")
        row_origin = origin if len(entry) < 4 else check_int64(entry[3], f"row {number} origin")
        if len(entry) == 5:
            pk_values = entry[4]
            if type(pk_values) is not list:
                raise _fail(f"row {number}: pk must be a list")
            pk = check_values(pk_values, len(pk_values), f"row {number} pk")
        elif positions is None:
            raise _fail(f"row {number}: no pk and its group has no pk positions")
        else:
            pk = tuple([values[p] for p in positions])
        append(make_row(table, op, pk, columns, values, version, row_origin))
    return ChangeBatch(origin=origin, rows=tuple(rows), fingerprints=fingerprints, primary_keys=primary_keys)


def header_from_document(document: Any) -> Header:
    """Checked origin, fingerprints, primary keys and groups of a body, and its raw rows."""
    if type(document) is not dict:
        raise _fail("body is not a CBOR map")
    try:
        origin, raw_tables, raw_groups, raw_rows = document["o"], document["t"], document["g"], document["r"]
    except KeyError as exc:
        raise _fail(f"body lacks key {exc.args[0]!r}") from None
    origin = check_int64(origin, "origin")

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
    groups: list[Group] = []
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



@dataclass(frozen=True)
class Fragment:
    """One piece of a large row: part `index` (0-based) of `count` of the CBOR body of the
    row's own one-row batch. The pieces of a row are consecutive messages of one run on its
    shard stream; receivers join them in order and decode the result (decode_assembled)."""

    origin: int
    index: int
    count: int
    piece: bytes


def is_fragment(document: Any) -> bool:
    return type(document) is dict and "f" in document


def fragment_from_document(document: dict[str, Any]) -> Fragment:
    origin = check_int64(document.get("o"), "origin")
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
