"""What one node holds of a replicated table, read for `verify` and `repair` without the write lock.

Everything here runs on a read-only connection inside one read transaction (WAL: readers never
block the writer and the writer never blocks them), on the verify service's own thread.

Keys and buckets. A row's *bucket* is CRC-32 of its primary key's text form modulo the bucket
count the caller asks for; its *row hash* is BLAKE2b-128 of the row's text form, columns in
column-name order (so column order in the CREATE TABLE does not matter; the column names are
compared separately). The text form is Python's repr() of the value tuple, which keeps SQLite's
storage classes apart (1, 1.0, '1' and b'1' differ; -0.0 differs from 0.0; floats print
exactly) and is computed in C: hashing a million rows this way is about twice as fast as
encoding every value with replication/canonical.py, which only the keys that differ use
(key_bytes: to match keys across nodes). A bucket's digest is the sum of its rows' hashes
modulo 2**128 (order-independent) plus the row count: equal buckets hold equal rows.

Versions. A key's (version, origin, deleted) is the newest of the versions table
(`_marmot_ver_<table>`, replication/bookkeeping.py) and this node's own log rows not published
yet (those are folded into the versions table only when they are retired). A row with no
version at all (data that predates capture) counts as version 0, origin 0.
"""

from __future__ import annotations

import hashlib
import json
import operator
import sqlite3
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.bookkeeping import META_TOMBSTONE_HORIZON
from marmot_appliance.replication.canonical import encode_value
from marmot_appliance.replication.introspect import TableLayout, table_layout, user_tables
from marmot_appliance.replication.sqlite_util import connect, quote_ident, read_transaction
from marmot_appliance.replication.types import POSITIONS_TABLE
from marmot_appliance.spec.model import TableSelection

ROW_HASH_BYTES = 16
_MODULUS = 1 << (8 * ROW_HASH_BYTES)
NO_VERSION = (0, 0)
MAX_SCOPE_ROWS = 500_000  # rows a full-scan keys listing keeps for the caller's next chunks


class TableNotReplicated(LookupError):
    """The table does not exist here, has no primary key, or is not selected on this node."""


def key_bytes(values: tuple[Any, ...] | list[Any]) -> bytes:
    return b"".join(encode_value(value) for value in values)


def _text(values: tuple) -> bytes:
    return repr(values).encode("utf-8", "surrogatepass")


def bucket_of(key: tuple[Any, ...], buckets: int) -> int:
    return zlib.crc32(_text(tuple(key))) % buckets


def row_hash(row: tuple) -> bytes:
    """Hash of a row's values, in column-name order."""
    return hashlib.blake2b(_text(tuple(row)), digest_size=ROW_HASH_BYTES).digest()


@dataclass(frozen=True)
class KeyState:
    """One key on one node: its row (hash and values, None when absent) and its version."""

    key: tuple[Any, ...]
    row_hash: bytes | None
    version: int
    origin: int
    deleted: bool
    row: dict[str, Any] | None = None  # column -> value, only when asked for (repair)

    def to_wire(self) -> list:
        return [list(self.key), self.row_hash, self.version, self.origin, self.deleted, self.row]

    @classmethod
    def from_wire(cls, item: list) -> "KeyState":
        key, row_hash, version, origin, deleted, row = item
        return cls(tuple(key), row_hash, int(version), int(origin), bool(deleted), row)


class TableStateReader:
    """Reads bucket digests, keys and versions of this node's replicated tables."""

    def __init__(self, db_path: str | Path, node_id: int, selection: TableSelection):
        self.db_path = str(db_path)
        self.node_id = node_id
        self.selection = selection
        self._conn: sqlite3.Connection | None = None
        # (table, buckets) -> where the last digest put each row: listing a bucket's keys then
        # reads only those rows by rowid instead of scanning the whole table again.
        self._placement: dict[tuple[str, int], _Placement] = {}
        self._digests: dict[tuple[str, int], tuple[int, dict]] = {}  # (table, buckets) -> (data_version, digest)
        self._scope_rows: tuple | None = None  # rows of a keys scope read by one full scan (_scan_scope)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.db_path, readonly=True, cache_mib=16)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- what this node replicates --------------------------------------------------------------

    def tables(self) -> list[str]:
        conn = self._connection()
        with read_transaction(conn):
            return [name for name in user_tables(conn) if self._layout_if_replicated(conn, name)]

    def _layout_if_replicated(self, conn: sqlite3.Connection, table: str) -> TableLayout | None:
        layout = table_layout(conn, table) if self.selection.selects(table) else None
        if layout is None or not layout.primary_key or table not in user_tables(conn):
            return None
        return layout

    def _replicated_layout(self, conn: sqlite3.Connection, table: str) -> TableLayout:
        layout = self._layout_if_replicated(conn, table)
        if layout is None:
            raise TableNotReplicated(f"table {table!r} is not replicated on this node")
        return layout

    def progress(self) -> dict:
        """Applied positions per stream and the oldest version not yet published (None: none)."""
        conn = self._connection()
        with read_transaction(conn):
            return self._progress(conn)

    def _progress(self, conn: sqlite3.Connection) -> dict:
        positions = {}
        if bk.object_exists(conn, POSITIONS_TABLE):
            positions = {str(s): int(q) for s, q in conn.execute(f"SELECT stream, seq FROM {quote_ident(POSITIONS_TABLE)}")}
        oldest = None
        for log_name in bk.log_tables(conn):
            row = conn.execute(f"SELECT min(id) FROM {quote_ident(log_name)}").fetchone()
            if row[0] is not None:
                oldest = int(row[0]) if oldest is None else min(oldest, int(row[0]))
        # Rows this node holds back on purpose (parked for a table or column it lacks, held for
        # clock skew): not applied yet although their positions are. Keys they touch are
        # "catching up", not diverged.
        waiting: dict[str, int] = {}
        for holding in (bk.PARKED_TABLE, bk.HELD_TABLE):
            if bk.object_exists(conn, holding):
                for tbl, count in conn.execute(f"SELECT tbl, count(*) FROM {quote_ident(holding)} GROUP BY tbl"):
                    waiting[str(tbl)] = waiting.get(str(tbl), 0) + int(count)
        # Rows at or below this version are stale to this node's applier (tombstone collection,
        # docs/capture.md): repair must send such rows with a fresh version (verify/repair.py).
        horizon = int(bk.get_meta(conn, META_TOMBSTONE_HORIZON, 0) or 0) if bk.object_exists(conn, bk.META_TABLE) else 0
        return {"positions": positions, "unpublished_from": oldest, "waiting": waiting, "horizon": horizon}

    def clock(self) -> int:
        """This node's hybrid clock (what its next local write will outrank)."""
        conn = self._connection()
        with read_transaction(conn):
            return bk.current_clock(conn) if bk.object_exists(conn, bk.CLOCK_TABLE) else 0

    def table_shape(self, table: str) -> dict:
        """Columns (table order), primary key and layout fingerprint, as capture records them."""
        conn = self._connection()
        with read_transaction(conn):
            layout = self._replicated_layout(conn, table)
            return {"columns": list(layout.columns), "key": list(layout.primary_key), "fingerprint": layout.fingerprint}

    # -- digests -----------------------------------------------------------------------------------

    def bucket_digests(self, table: str, buckets: int) -> dict:
        """{"columns", "key", "sums": bytes (16 per bucket), "counts": [...], "rows", progress...}."""
        conn = self._connection()
        with read_transaction(conn):
            layout = self._replicated_layout(conn, table)
            # Nothing committed since the last digest of this table (PRAGMA data_version): the
            # same answer, without a scan. Every node's continuous check asks every node, so on
            # a quiet cluster this turns N digests per interval into one.
            version = _data_version(conn)
            cached = self._digests.get((table, buckets))
            if cached is not None and cached[0] == version:
                return {**cached[1], **self._progress(conn)}
            sql, key_of = _canonical_select(layout)
            rowid = _rowid_name(layout)
            placement = _Placement() if rowid else None
            if rowid:
                sql = sql.replace("SELECT ", f"SELECT {rowid}, ", 1)
            sums = [0] * buckets
            counts = [0] * buckets
            blake, crc, from_bytes = hashlib.blake2b, zlib.crc32, int.from_bytes
            # The hot loop of `verify`: one C-level repr, CRC and BLAKE2b per row.
            for row in conn.execute(sql):
                if placement is not None:
                    placement.rowids.append(row[0])
                    row = row[1:]
                bucket = crc(repr(key_of(row)).encode("utf-8", "surrogatepass")) % buckets
                if placement is not None:
                    placement.buckets.append(bucket)
                sums[bucket] += from_bytes(blake(repr(row).encode("utf-8", "surrogatepass"),
                                                 digest_size=ROW_HASH_BYTES).digest(), "big")
                counts[bucket] += 1
            self._placement.pop((table, buckets), None)
            if placement is not None:
                placement.data_version = _data_version(conn)
                self._placement = {(table, buckets): placement}  # the newest only: bounded memory
            packed = b"".join((value % _MODULUS).to_bytes(ROW_HASH_BYTES, "big") for value in sums)
            answer = {
                "columns": sorted(layout.columns), "key": list(layout.primary_key), "sums": packed,
                "counts": counts, "rows": sum(counts),
            }
            self._digests[(table, buckets)] = (version, answer)
            return {**answer, **self._progress(conn)}

    def keys_in_buckets(self, table: str, buckets: int, wanted: list[int], scope: list[int] | None = None) -> dict:
        """[key, row hash] of every row in the given buckets (versions: ask `lookup` for the keys that differ).

        Right after a digest of the same table and bucket count (the usual order), only the rows
        that digest placed in those buckets are read, by rowid; otherwise the whole table is
        scanned again.
        """
        wanted_set = set(wanted)
        conn = self._connection()
        with read_transaction(conn):
            layout = self._replicated_layout(conn, table)
            sql, key_of = _canonical_select(layout)
            placement = self._placement.get((table, buckets))
            rowid = _rowid_name(layout)
            found = []
            # With an INTEGER PRIMARY KEY the rowid is the key and a row never moves: rows written
            # since the digest are read fresh (and re-bucketed), rows added since are left out
            # (the digest did not see them either). Other rowids may be renumbered by VACUUM:
            # used only while nothing was written since.
            if placement is not None and rowid and (layout.rowid_alias or placement.data_version == _data_version(conn)):
                rowids = placement.rowids_in(wanted, buckets)
                by_rowid = f"{sql} WHERE {rowid} IN (SELECT value FROM json_each(?))"
                for start in range(0, len(rowids), 10_000):
                    chunk = json.dumps(rowids[start:start + 10_000])
                    for row in conn.execute(by_rowid, (chunk,)):
                        key = key_of(row)
                        if bucket_of(key, buckets) in wanted_set:
                            found.append([list(key), row_hash(row)])
            else:
                found = self._scan_scope(conn, table, buckets, sql, key_of, wanted_set, scope)
            return {"keys": found, **self._progress(conn)}

    def _scan_scope(self, conn, table: str, buckets: int, sql: str, key_of, wanted: set[int],
                    scope: list[int] | None) -> list:
        """A full scan for the keys of `wanted`; with a `scope` (every bucket the caller will ask
        for, chunk by chunk), one scan serves all chunks: the scope's rows are kept until asked."""
        scope_key = (table, buckets, tuple(sorted(scope or ())), _data_version(conn))
        cached = self._scope_rows if self._scope_rows and self._scope_rows[0] == scope_key else None
        if cached is None:
            keep = set(scope) if scope else wanted
            by_bucket: dict[int, list] = {}
            kept = 0
            for row in conn.execute(sql):
                key = key_of(row)
                bucket = bucket_of(key, buckets)
                if bucket in keep:
                    by_bucket.setdefault(bucket, []).append([list(key), row_hash(row)])
                    kept += 1
            cached = (scope_key, by_bucket)
            self._scope_rows = cached if scope and kept <= MAX_SCOPE_ROWS else None
        return [item for bucket in sorted(wanted) for item in cached[1].get(bucket, ())]

    def lookup(self, table: str, keys: list[list[Any]], with_rows: bool = False) -> dict:
        """The state of each given key (present or not), with progress."""
        conn = self._connection()
        with read_transaction(conn):
            layout = self._replicated_layout(conn, table)
            select, _key_of = _canonical_select(layout)
            names = sorted(layout.columns)
            where = " AND ".join(f"{quote_ident(col)} = ?" for col in layout.primary_key)
            sql = f"{select} WHERE {where}"
            versions = _VersionLookup(conn, layout, self.node_id)
            items = []
            for raw_key in keys:
                key = tuple(raw_key)
                if len(key) != len(layout.primary_key):
                    raise TableNotReplicated(f"table {table!r}: key {key!r} does not match its primary key")
                row = conn.execute(sql, key).fetchone()
                version, origin, deleted = versions.get(key)
                image = dict(zip(names, row)) if (row is not None and with_rows) else None
                items.append(KeyState(key, row_hash(row) if row is not None else None, version, origin, deleted,
                                      image).to_wire())
            return {"keys": items, **self._progress(conn)}


class _Placement:
    """Rowid and bucket of every row, as one digest saw them (about 10 bytes a row)."""

    def __init__(self) -> None:
        self.rowids = array("q")
        self.buckets = array("H")  # buckets are at most 65536
        self.data_version = -1
        self._by_bucket: array | None = None  # rowids grouped by bucket (built on the first listing)
        self._starts: list[int] = []

    def rowids_in(self, wanted: list[int], buckets: int) -> list[int]:
        """The rowids the digest put in the wanted buckets. The first call groups every rowid by
        bucket (one counting sort, about 10 more bytes a row); each call after that costs only the
        rows it returns: a listing asks chunk by chunk, and a scan of the whole placement per
        chunk made naming 1,000 keys in a million rows take seconds."""
        if self._by_bucket is None:
            starts = [0] * (buckets + 1)
            for bucket in self.buckets:
                starts[bucket + 1] += 1
            for bucket in range(buckets):
                starts[bucket + 1] += starts[bucket]
            grouped = array("q", bytes(8 * len(self.rowids)))
            fill = starts[:-1]
            for rowid, bucket in zip(self.rowids, self.buckets):
                grouped[fill[bucket]] = rowid
                fill[bucket] += 1
            self._by_bucket, self._starts = grouped, starts
        grouped, starts = self._by_bucket, self._starts
        return [rowid for bucket in sorted(set(wanted)) for rowid in grouped[starts[bucket]:starts[bucket + 1]]]


def _data_version(conn: sqlite3.Connection) -> int:
    """Changes whenever another connection committed to the file (so cached placements are stale)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _rowid_name(layout: TableLayout) -> str | None:
    """A name that reaches the rowid (none for WITHOUT ROWID tables or when columns shadow all three)."""
    if layout.without_rowid:
        return None
    taken = {col.lower() for col in layout.columns}
    return next((name for name in ("rowid", "_rowid_", "oid") if name not in taken), None)


def _canonical_select(layout: TableLayout) -> tuple[str, Any]:
    """SELECT of every column in column-name order, and a function giving a row's key tuple."""
    names = sorted(layout.columns)
    positions = [names.index(col) for col in layout.primary_key]
    sql = f"SELECT {', '.join(quote_ident(col) for col in names)} FROM {quote_ident(layout.name)}"
    if len(positions) == 1:
        only = positions[0]
        return sql, lambda row: (row[only],)
    getter = operator.itemgetter(*positions)
    return sql, getter


class _VersionLookup:
    """(version, origin, deleted) of keys: the versions table merged with unpublished log rows."""

    def __init__(self, conn: sqlite3.Connection, layout: TableLayout, node_id: int):
        self._conn = conn
        arity = bk.versions_key_arity(conn, layout.name)
        self._sql = None
        if arity == len(layout.primary_key):
            where = " AND ".join(f"{quote_ident(bk.key_column(i))} = ?" for i in range(arity))
            self._sql = (
                f"SELECT version, origin, deleted FROM {quote_ident(bk.versions_table_name(layout.name))} WHERE {where}"
            )
        self._unpublished = _unpublished_versions(conn, layout, node_id)

    def get(self, key: tuple[Any, ...]) -> tuple[int, int, bool]:
        best = (0, 0, False)
        if self._sql is not None:
            row = self._conn.execute(self._sql, key).fetchone()
            if row is not None:
                best = (int(row[0]), int(row[1]), bool(row[2]))
        local = self._unpublished.get(key_bytes(key))
        if local is not None and local[:2] > best[:2]:
            best = local
        return best


def _unpublished_versions(conn: sqlite3.Connection, layout: TableLayout, node_id: int) -> dict[bytes, tuple[int, int, bool]]:
    """key bytes -> newest (version, origin, deleted) among this node's unpublished log rows."""
    log_name = bk.log_table_name(layout.name)
    if not bk.object_exists(conn, log_name):
        return {}
    layouts = bk.layouts_by_id(conn)
    newest: dict[bytes, tuple[int, int, bool]] = {}
    for row in conn.execute(f"SELECT * FROM {quote_ident(log_name)} ORDER BY id"):
        known = layouts.get(int(row[1]))
        if known is None or tuple(known[2]) != tuple(layout.primary_key):
            continue  # written with another key shape: cannot be matched to today's keys
        columns = known[1]
        key = tuple(row[3 + columns.index(col)] for col in known[2])
        newest[key_bytes(key)] = (int(row[0]), node_id, int(row[2]) == bk.OP_DELETE)
    return newest
