"""The fast decoding for the applier: a batch as row groups ready for executemany.

Every check of the strict reader (document.py) holds for what this accepts (types of values,
64-bit integers, widths, group indexes), but done per column in C (set/map/zip/array) instead
of per value in Python. What it does not accept it hands back as None, and the caller decodes
strictly, for exactly the strict reader's result or error.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from marmot_appliance.replication.types import ChangeBatch, RowChange
from marmot_appliance.replication.wire.document import VALUE_TYPES, header_from_document, make_row

_FIRST = itemgetter(0)


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
        out: list[RowChange] = []
        for entry in self.params:
            values = tuple(entry[:width])
            pk = tuple([values[p] for p in positions])
            out.append(make_row(self.table, self.op, pk, self.columns, values, entry[width], entry[width + 1]))
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


def _int64_column(column: tuple[Any, ...], kinds: set[type]) -> bool:
    """True when every int in a column fits SQLite's 64-bit INTEGER (array('q') checks in C)."""
    if int not in kinds:
        return True
    try:
        array("q", column if len(kinds) == 1 else [v for v in column if type(v) is int])
    except OverflowError:
        return False
    return True


def grouped_from_document(document: Any) -> GroupedBatch | None:
    """The batch as row groups, or None when it is not of the common well-formed shape.

    Every check of the strict decoder holds for what this accepts (types of values, 64-bit
    integers, widths, group indexes), but done per column in C (set/map/zip/array) instead of
    per value in Python. Appends version and origin to the decoded value lists in place.
    """
    origin, fingerprints, primary_keys, groups, raw_rows = header_from_document(document)
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
        if positions is None:  # excluded above; says so to the type checker
            return None
        width = len(columns) + 2
        if set(map(type, params)) != {list} or set(map(len, params)) != {width}:
            return None  # values were not a list, or of the wrong width
        for position, column in enumerate(zip(*params)):
            kinds = set(map(type, column))
            if position >= width - 2:  # version, origin: integers only
                if kinds != {int}:
                    return None
            elif not kinds <= VALUE_TYPES:
                return None
            if not _int64_column(column, kinds):
                return None
        out.append(RowGroup(table, op, columns, positions, params))
    return GroupedBatch(origin, out, fingerprints, primary_keys, len(raw_rows))
