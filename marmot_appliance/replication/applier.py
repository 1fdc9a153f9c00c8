"""Apply other nodes' change batches to the local database: last writer wins, exactly once.

One batch (or several) = one SQLite transaction (BEGIN IMMEDIATE) that

  1. inserts the marker row, so the capture triggers ignore everything this transaction writes;
  2. folds the versions of local, not yet published log rows (they are newer-than-published
     local state and must take part in the comparison);
  3. records each incoming row's (version, origin) in the table's versions table unless an equal
     or newer version is known (ON CONFLICT ... WHERE newer): the versions table now names the
     winner of every key this batch touches, including duplicates within the batch;
  4. applies exactly the rows that won (INSERT ... ON CONFLICT(pk) DO UPDATE SET <columns>, or
     DELETE), each guarded by "the versions table holds my (version, origin)"; an upsert is a
     full row image: local columns it does not carry are set to their DEFAULT. When every row
     of a group won its versions record and no two rows share a key, the guard holds for all
     of them and the group goes through the same statement without it (cheaper per row);
  5. advances the hybrid clock to the newest version received, writes the stream position, and
     deletes the marker, then commits.

Everything per row runs in SQLite through executemany; Python only groups rows by table and
column layout. Rows for tables that are not selected are ignored; rows for a table or a column
this node does not have are parked and retried by retry_parked() once that table's schema
changes; rows whose version lies beyond max_clock_skew_s ahead of the wall clock are held (and
do not move the clock) until retry_held() finds time caught up, or dead-lettered when absurd
(clock_bound.py). Parked and held rows together are bounded by max_parked_rows.
A row SQLite refuses (e.g. a UNIQUE constraint other than the key) is dead-lettered on its own;
the rest of the batch still applies.

Position fence: a snapshot restore replaces the whole file, positions included, while an apply
may be waiting for the write lock. The applier remembers the file's *database epoch*
(`_marmot_meta.database_epoch`, rewritten by every restore) and writes a position only while the
file still carries it; otherwise the transaction rolls back with DatabaseReplacedError and the
runtime restarts every consumer from the restored positions. A position written into a restored
file by an apply begun before the restore would skip the entries in between (issue 10, case 1).

Own-origin batches: rows this node wrote are already in its database, so they are skipped (the
position still advances), except rows older than the *own-origin horizon*: the moment this
database started recording this node's writes (first install, or restore/replacement of the
file). Older own rows may be missing from the file, so they are applied with the usual checks.
"""

from __future__ import annotations

import contextlib
import operator
from collections import Counter
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cbor2

from marmot_appliance.errors import DatabaseStateError, MarmotError
from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication import codec, fragments
from marmot_appliance.replication.clock_bound import ClockLimits, clock_limits
from marmot_appliance.replication.codec import GroupedBatch
from marmot_appliance.replication.introspect import TableLayout, table_layout, unique_indexes, user_tables
from marmot_appliance.replication.payload_bounds import bounded_payload
from marmot_appliance.replication.sqlite_util import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DatabaseBusyError,
    connect,
    is_busy_error,
    is_environment_error,
    quote_ident,
    read_transaction,
    rollback_to_savepoint,
    schema_version,
    write_transaction,
)
from marmot_appliance.replication.trigger_guard import AppTriggerGuard
from marmot_appliance.replication.types import DEAD_LETTER_TABLE, POSITIONS_TABLE, ChangeBatch, RowChange
from marmot_appliance.spec.model import ReplicationSettings, TableSelection

__all__ = [
    "ApplyError",
    "ApplyOutcome",
    "BatchApplier",
    "DatabaseReplacedError",
    "DatabaseBusyError",
    "decode_parked_change",
    "encode_parked_change",
    "reset_own_origin_horizon",
]

META_OWN_ORIGIN_HORIZON = "own_origin_horizon"
DEFAULT_MAX_CLOCK_SKEW_S = ReplicationSettings.max_clock_skew_s
DEFAULT_MAX_PARKED_ROWS = ReplicationSettings.max_parked_rows
# Parked or held rows retried per transaction: the write lock is held for one chunk at a time.
RETRY_CHUNK_ROWS = 500

# Per-transaction statements, built once.
_MARKER_ON_SQL = f"INSERT OR IGNORE INTO {quote_ident(bk.MARKER_TABLE)} (id) VALUES (1)"
_MARKER_OFF_SQL = f"DELETE FROM {quote_ident(bk.MARKER_TABLE)}"
_POSITIONS_SQL = f"SELECT stream, seq FROM {quote_ident(POSITIONS_TABLE)}"
_PARK_SQL = (
    f"INSERT INTO {quote_ident(bk.PARKED_TABLE)} (tbl, reason, change, stream, seq, parked_at) VALUES (?, ?, ?, ?, ?, ?)"
)
_HOLD_SQL = (
    f"INSERT INTO {quote_ident(bk.HELD_TABLE)} (tbl, reason, change, stream, seq, held_at, due_at, origin, version) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# No max(): positions only ever move forward because every caller writes a sequence above the
# stored one (apply_many drops duplicates), and the fence below, not max(), keeps a position from
# before a restore out of the restored file.
_POSITION_UPSERT_SQL = (
    f"INSERT INTO {quote_ident(POSITIONS_TABLE)} (stream, seq) VALUES (?, ?) "
    "ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq"
)


class ApplyError(MarmotError):
    """A batch could not be applied for a reason retrying will not fix: dead-letter it."""


class DatabaseReplacedError(MarmotError):
    """The file was replaced (a snapshot restore) since this applier adopted it.

    Nothing was written. Not transient and not the message's fault: never retry or dead-letter
    it; stop applying until the runtime has adopted the file (`adopt_database`) and restarted
    the consumers from the positions the file now holds.
    """


@dataclass
class ApplyOutcome:
    stream: str
    seq: int
    duplicate: bool = False  # seq at or below the stored position: nothing done
    own_origin: bool = False  # this node's own batch: rows skipped, position advanced
    rows_applied: int = 0  # rows whose version won (including tombstones for absent rows)
    rows_stale: int = 0  # rows an equal or newer version already covered
    rows_parked: int = 0  # rows for a table/column this node lacks, kept for retry_parked()
    rows_held: int = 0  # rows from further ahead than max_clock_skew_s, kept for retry_held()
    rows_ignored: int = 0  # rows for tables not selected on this node
    rows_rejected: int = 0  # rows SQLite refused (constraint errors): dead-lettered one by one
    max_version: int = 0


def encode_parked_change(change: RowChange) -> bytes:
    return cbor2.dumps(
        [change.table, change.op, list(change.pk), list(change.columns), list(change.values), change.version, change.origin]
    )


@dataclass(frozen=True)
class WaitingReport:
    """Rows not applied yet, and what was given up on, for /health, status and metrics."""

    parked_rows: int  # waiting for a table or column (retried when that table's schema changes)
    held_by_origin: dict[int, tuple[int, float]]  # origin -> (held rows, seconds its newest is ahead now)
    skew_dead_letters_by_origin: dict[int, tuple[int, float]]  # origin -> (rows, most seconds ahead seen)
    park_overflow: int  # rows dead-lettered because max_parked_rows was reached (since start)
    retried_rows: int  # parked rows a retry looked at (since start)
    retry_chunks: int  # transactions those retries took (since start)
    dead_lettered_rows: int = 0  # rows this applier set aside one at a time (since start; not whole messages)


def decode_parked_change(blob: bytes) -> RowChange:
    table, op, pk, columns, values, version, origin = cbor2.loads(blob)
    return RowChange(table, op, tuple(pk), tuple(columns), tuple(values), int(version), int(origin))


def reset_own_origin_horizon(db_path: str | Path, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> int:
    """Declare that this database file may lack some of this node's own earlier writes.

    Call after replacing the file's contents (snapshot restore, copying a database in): own-origin
    rows up to now are then applied from the streams (version-checked) instead of skipped.
    Returns the new horizon.
    """
    conn = connect(db_path, busy_timeout_ms=busy_timeout_ms)
    try:
        with write_transaction(conn):
            bk.ensure_bookkeeping(conn)
            return _set_horizon_now(conn)
    finally:
        conn.close()


@contextlib.contextmanager
def _environment_errors(db_path: Path) -> Iterator[None]:
    """Disk full, read-only file, corruption: the database's problem, not the message's."""
    try:
        yield
    except sqlite3.Error as exc:
        if is_environment_error(exc):
            raise DatabaseStateError(f"database {db_path} cannot be written: {exc}") from exc
        raise


def _now_version() -> int:
    return int(time.time() * 1000) << 16


def _set_horizon_now(conn: sqlite3.Connection) -> int:
    horizon = max(_now_version(), bk.current_clock(conn))
    bk.set_meta(conn, META_OWN_ORIGIN_HORIZON, horizon)
    # Every later local write must rank above the horizon: in the same millisecond the trigger's
    # max(now_ms << 16, hlc + 1) could otherwise land exactly on it and count as "older".
    bk.advance_clock(conn, horizon)
    return horizon


@dataclass(frozen=True)
class _RowPlan:
    """How rows of one (table, columns, op) shape are applied; computed once per shape."""

    action: str  # "apply", "park" or "ignore"
    reason: str = ""
    table: str = ""  # the local table's real name
    versions_sql: str = ""
    apply_sql: str = ""
    key_of: object = None  # values -> tuple of key values in local primary-key order
    deleted: int = 0
    # The versions upsert over a GroupedBatch row ([*values, version, origin], numbered params).
    grouped_versions_sql: str = ""
    # The row statement without the "versions table holds my version" guard, over the same
    # parameters, for a group whose every row won (see _apply_groups); "" when not allowed.
    unguarded_sql: str = ""
    grouped_key: object = None  # grouped row -> its key (a value, or a tuple for a composite key)


class _VersionGetters(dict):
    """width -> itemgetter of a grouped row's version ([*values, version, origin])."""

    def __missing__(self, width: int) -> operator.itemgetter:
        getter = self[width] = operator.itemgetter(width)
        return getter


_VERSION_OF = _VersionGetters()


def _all_newer(batch: GroupedBatch, horizon: int) -> bool:
    """Whether every row of the batch has a version above `horizon`."""
    return all(min(map(_VERSION_OF[len(group.columns)], group.params)) > horizon
               for group in batch.groups if group.params)


def _single_key(index: int):
    def key_of(values: Sequence[object]) -> tuple:
        return (values[index],)

    return key_of


class BatchApplier:
    """Applies ChangeBatches to one database. One connection; one caller at a time."""

    def __init__(
        self,
        db_path: str | Path,
        node_id: int,
        selection: TableSelection | None = None,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
        max_parked_rows: int = DEFAULT_MAX_PARKED_ROWS,
    ):
        self.db_path = Path(db_path)
        self.node_id = int(node_id)
        self.selection = selection or TableSelection()
        self.max_clock_skew_s = float(max_clock_skew_s)
        self.max_parked_rows = int(max_parked_rows)
        self._limits: ClockLimits = clock_limits(self.max_clock_skew_s)  # renewed per transaction
        self._tombstone_horizon = 0  # tombstone horizon, read at the start of each transaction (bk.tombstone_horizon)
        self._waiting_count: int | None = None  # parked + held rows; counted once, then kept current
        self._tx_counts: Counter = Counter()  # this transaction's events, merged into _counts on commit
        self._counts: Counter = Counter()  # ("skew", origin) / ("park_overflow",) / ... since start
        self._skew_seen: dict[int, float] = {}  # origin -> most seconds ahead among dead-lettered rows
        # Parked-row retries: table -> its local layout signature at its last retry, and the
        # tables (with the last id visited) a retry in progress still has to go through.
        self._parked_retried: dict[str, tuple] = {}
        self._retry_queue: list[tuple[str, tuple]] = []
        self._retry_cursor = 0
        self._parked_checked_schema: int | None = None  # schema version the last retry was planned on
        self._conn = connect(
            self.db_path, busy_timeout_ms=busy_timeout_ms, synchronous_normal=True, cache_mib=64, temp_store_memory=True
        )
        # The application's triggers must not write replicated tables again on apply (their
        # effects arrive as captured changes) but must keep maintaining derived state.
        self._trigger_guard = AppTriggerGuard()
        self._trigger_guard.install(self._conn)
        self._schema_version: int | None = None
        self._layouts: dict[str, TableLayout] = {}  # lower-case name -> layout
        self._plans: dict[tuple[str, tuple[str, ...], str], _RowPlan] = {}
        self._versions_ready: set[str] = set()
        with write_transaction(self._conn):
            bk.ensure_bookkeeping(self._conn)
            if bk.get_meta(self._conn, META_OWN_ORIGIN_HORIZON) is None:
                _set_horizon_now(self._conn)
            self._epoch = bk.get_meta(self._conn, bk.META_DATABASE_EPOCH)

    # -- public API ----------------------------------------------------------------------------

    def adopt_database(self) -> dict[str, int]:
        """Accept the file as it is now (after a restore) and return its positions.

        Call only once nothing that began before the restore can still apply (every consumer
        stopped): from then on positions are written into this file again.
        """
        with write_transaction(self._conn):
            bk.ensure_bookkeeping(self._conn)  # a file saved by an older version may lack some
            self._epoch = bk.get_meta(self._conn, bk.META_DATABASE_EPOCH)
            self._schema_version = None  # the restored file has its own schema: re-read it
            # Its parked and held rows are not the ones we knew: count and retry them afresh.
            self._waiting_count = None
            self._parked_retried = {}
            self._retry_queue = []
            self._parked_checked_schema = None
            return self.positions()

    def stream_instance(self, stream: str) -> str | None:
        """The stream instance this file's position on `stream` counts in (None: not recorded)."""
        row = self._conn.execute(
            f"SELECT instance FROM {quote_ident(bk.STREAM_INSTANCES_TABLE)} WHERE stream = ?", (stream,)
        ).fetchone()
        return None if row is None else str(row[0])

    def record_stream_instance(self, stream: str, instance: str) -> None:
        with write_transaction(self._conn):
            self._set_stream_instance(stream, instance)

    def reset_stream(self, stream: str, instance: str) -> int:
        """The stream was re-created (or lost entries below our position): its position starts
        again at 0 in `instance`, in one transaction. Returns the position it had."""
        with write_transaction(self._conn):
            row = self._conn.execute(
                f"SELECT seq FROM {quote_ident(POSITIONS_TABLE)} WHERE stream = ?", (stream,)
            ).fetchone()
            self._write_positions({stream: 0})
            self._set_stream_instance(stream, instance)
        return 0 if row is None else int(row[0])

    def skip_gap(self, stream: str, position: int) -> int:
        """Move `stream`'s position to `position` without applying the entries below it: only
        for entries whose rows every node published again after `position` (node/gap_closer.py).
        Never lowers a position; fenced like every position write. Returns the stored position."""
        with write_transaction(self._conn):
            row = self._conn.execute(
                f"SELECT seq FROM {quote_ident(POSITIONS_TABLE)} WHERE stream = ?", (stream,)
            ).fetchone()
            stored = 0 if row is None else int(row[0])
            if stored >= position:
                return stored
            self._write_positions({stream: position})
        return position

    def _set_stream_instance(self, stream: str, instance: str) -> None:
        self._conn.execute(
            f"INSERT INTO {quote_ident(bk.STREAM_INSTANCES_TABLE)} (stream, instance) VALUES (?, ?) "
            "ON CONFLICT (stream) DO UPDATE SET instance = excluded.instance",
            (stream, instance),
        )

    def positions(self) -> dict[str, int]:
        return {
            stream: int(seq)
            for stream, seq in self._conn.execute(f"SELECT stream, seq FROM {quote_ident(POSITIONS_TABLE)}")
        }

    def apply(self, batch: ChangeBatch | GroupedBatch, stream: str, seq: int) -> ApplyOutcome:
        """Apply one batch in one transaction. Raises DatabaseBusyError (retry later)."""
        return self.apply_many([(batch, stream, seq)])[0]

    def apply_many(self, items: Iterable[tuple[ChangeBatch | GroupedBatch, str, int]]) -> list[ApplyOutcome]:
        """Apply several batches in one transaction (fewer commits when the consumer is behind).

        A batch may be a ChangeBatch or a GroupedBatch (codec.decode_for_apply): the latter is
        applied straight from its row groups, without a Python object per row.
        """
        items = list(items)
        outcomes: list[ApplyOutcome] = []
        conn = self._conn
        with self._applying():
            horizon: int | None = None  # read only when an own-origin batch needs it (rare)
            stored = dict(conn.execute(_POSITIONS_SQL).fetchall())
            newest = 0
            for batch, stream, seq in items:
                outcome = ApplyOutcome(stream=stream, seq=int(seq))
                outcomes.append(outcome)
                if seq <= stored.get(stream, 0):
                    outcome.duplicate = True
                    continue
                stored[stream] = int(seq)
                if batch.origin == self.node_id:
                    outcome.own_origin = True
                    if horizon is None:
                        horizon = int(bk.get_meta(conn, META_OWN_ORIGIN_HORIZON, 0) or 0)
                if isinstance(batch, GroupedBatch):
                    if batch.origin != self.node_id:
                        self._apply_groups(batch, outcome, stream, int(seq))
                        newest = max(newest, outcome.max_version)
                        continue
                    # Our own batch: the consumer decodes it when the stream delivered it before
                    # the publisher's ack named its sequence (16% of node 1's rows in one bench run).
                    # Usually every row is newer than the horizon: skip it without row objects.
                    if _all_newer(batch, horizon):
                        continue
                    batch = batch.to_change_batch()  # rare: our own batch from an earlier life
                rows = batch.rows
                if batch.origin == self.node_id:
                    # Own rows newer than the horizon were written into this very file.
                    rows = tuple(row for row in rows if row.version <= horizon)
                    if not rows:
                        continue
                self._apply_rows(rows, outcome, stream, int(seq))
                newest = max(newest, outcome.max_version)
            self._finish_applying(newest, {o.stream: stored[o.stream] for o in outcomes if not o.duplicate})
        return outcomes

    def dead_letter(self, stream: str, seq: int, payload: bytes, reason: str) -> None:
        """Record an unusable message and move the stream position past it, in one transaction."""
        with write_transaction(self._conn):
            self._record_dead_letter(stream, seq, payload, reason)
            self._write_positions({stream: int(seq)})

    def stage_fragment(self, stream: str, seq: int, fragment: codec.Fragment) -> fragments.StageOutcome:
        """Keep a large row's fragment until its last one (replication/fragments.py). A staged
        fragment moves the position in the same transaction; a completing or refused one does
        not (the caller applies the joined row, or dead-letters the message)."""
        with _environment_errors(self.db_path), write_transaction(self._conn):
            outcome = fragments.stage(self._conn, stream, int(seq), fragment)
            if outcome.body is None and outcome.refused is None:
                self._write_positions({stream: int(seq)})
        return outcome

    def clear_fragments(self, stream: str, origin: int) -> None:
        with _environment_errors(self.db_path), write_transaction(self._conn):
            fragments.clear(self._conn, stream, origin)

    def retry_parked(self, chunk_rows: int = RETRY_CHUNK_ROWS) -> int:
        """Apply parked rows of every table whose schema changed since its last retry.

        Each chunk of `chunk_rows` is its own transaction. Returns how many rows left the park.
        (The runtime drives start_parked_retry / retry_parked_chunk itself, so that applies from
        the streams interleave with a long retry.)
        """
        self.start_parked_retry()
        total = 0
        while True:
            retired, done = self.retry_parked_chunk(chunk_rows)
            total += retired
            if done:
                return total

    def start_parked_retry(self) -> bool:
        """Queue the tables whose parked rows may apply now; True when there is any.

        A table is queued when its local layout (columns, primary key, selected or not) differs
        from what it was at its last retry, or it was never retried by this process: rows parked
        for a table whose schema did not change would only be parked again. Reads only.
        """
        conn = self._conn
        if self._retry_queue:
            return True  # a retry is under way: finish it first
        with read_transaction(conn):
            self._refresh_schema()
            if self._schema_version == self._parked_checked_schema:
                return False  # no table changed since the last look: nothing can apply now
            tables = [row[0] for row in conn.execute(f"SELECT DISTINCT tbl FROM {quote_ident(bk.PARKED_TABLE)}")]
        self._parked_checked_schema = self._schema_version
        self._retry_queue = [
            (table, signature)
            for table in tables
            if self._parked_retried.get(table) != (signature := self._table_signature(table))
        ]
        self._retry_cursor = 0
        return bool(self._retry_queue)

    def retry_parked_chunk(self, chunk_rows: int = RETRY_CHUNK_ROWS) -> tuple[int, bool]:
        """One transaction of the queued retry: (rows that left the park, whether it is done)."""
        if not self._retry_queue:
            return 0, True
        table, signature = self._retry_queue[0]
        with self._applying() as conn:
            rows = conn.execute(
                f"SELECT id, change, stream, seq FROM {quote_ident(bk.PARKED_TABLE)} "
                "WHERE tbl = ? AND id > ? ORDER BY id LIMIT ?",
                (table, self._retry_cursor, chunk_rows),
            ).fetchall()
            retired = self._retry_waiting(rows, held=False)
            self._tx_counts["retried_rows"] += len(rows)
            self._tx_counts["retry_chunks"] += 1
        if len(rows) < chunk_rows:
            self._parked_retried[table] = signature
            self._retry_queue.pop(0)
            self._retry_cursor = 0
        else:
            self._retry_cursor = rows[-1][0]
        return retired, not self._retry_queue

    def retry_held(self, chunk_rows: int = RETRY_CHUNK_ROWS) -> int:
        """Apply held rows whose version the clock has caught up with. Returns how many left."""
        total = 0
        after = 0
        due_sql = f"SELECT 1 FROM {quote_ident(bk.HELD_TABLE)} WHERE due_at <= ? AND id > ? LIMIT 1"
        while True:
            # Look first without the write lock: most of the time nothing is due.
            if self._conn.execute(due_sql, (time.time(), after)).fetchone() is None:
                return total
            with self._applying() as conn:
                rows = conn.execute(
                    f"SELECT id, change, stream, seq FROM {quote_ident(bk.HELD_TABLE)} "
                    "WHERE due_at <= ? AND id > ? ORDER BY id LIMIT ?",
                    (self._limits.now_s, after, chunk_rows),
                ).fetchall()
                total += self._retry_waiting(rows, held=True)
            if len(rows) < chunk_rows:
                return total
            after = rows[-1][0]

    def waiting_report(self) -> WaitingReport:
        conn = self._conn
        now = clock_limits(self.max_clock_skew_s)
        with read_transaction(conn):
            waiting = self._count_waiting()
            held = {
                int(origin): (int(count), now.ahead_s(int(newest)))
                for origin, count, newest in conn.execute(
                    f"SELECT origin, count(*), max(version) FROM {quote_ident(bk.HELD_TABLE)} GROUP BY origin"
                )
            }
        counts = self._counts
        return WaitingReport(
            parked_rows=max(0, waiting - sum(count for count, _ in held.values())),
            held_by_origin=held,
            skew_dead_letters_by_origin={
                origin: (counts[("skew", origin)], ahead) for origin, ahead in self._skew_seen.items()
            },
            park_overflow=counts[("park_overflow",)],
            retried_rows=counts["retried_rows"],
            retry_chunks=counts["retry_chunks"],
            dead_lettered_rows=counts["dead_lettered_rows"],
        )

    def dead_letter_count(self) -> int:
        return int(self._conn.execute(f"SELECT count(*) FROM {quote_ident(DEAD_LETTER_TABLE)}").fetchone()[0])

    def parked_count(self) -> int:
        return int(self._conn.execute(f"SELECT count(*) FROM {quote_ident(bk.PARKED_TABLE)}").fetchone()[0])

    def held_count(self) -> int:
        return int(self._conn.execute(f"SELECT count(*) FROM {quote_ident(bk.HELD_TABLE)}").fetchone()[0])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "BatchApplier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transaction frame ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _applying(self) -> Iterator[sqlite3.Connection]:
        """One write transaction of the applier: marker, schema, fold, clock limits; counters on commit."""
        self._tx_counts = Counter()
        try:
            with _environment_errors(self.db_path), write_transaction(self._conn):
                self._begin_applying()
                yield self._conn
        except BaseException:
            self._waiting_count = None  # parked/held rows of this transaction rolled back: recount
            raise
        self._counts.update(self._tx_counts)

    def _begin_applying(self) -> None:
        conn = self._conn
        self._limits = clock_limits(self.max_clock_skew_s)
        conn.execute(_MARKER_ON_SQL)
        self._refresh_schema()
        bk.fold_pending(conn)
        self._tombstone_horizon = bk.tombstone_horizon(conn)

    def _finish_applying(self, newest_version: int, positions: dict[str, int]) -> None:
        conn = self._conn
        if newest_version:
            # Our own writes are not logged (marker), and _begin_applying folded, so no log row
            # lies between the old watermark and the advanced clock: move the watermark too,
            # sparing the next fold a scan.
            bk.advance_clock_and_watermark(conn, newest_version)
        self._write_positions(positions)
        conn.execute(_MARKER_OFF_SQL)

    def _write_positions(self, positions: dict[str, int]) -> None:
        """Store positions, inside the caller's transaction, only into the file we adopted."""
        if not positions:
            return
        if bk.get_meta(self._conn, bk.META_DATABASE_EPOCH) != self._epoch:
            raise DatabaseReplacedError(
                f"database {self.db_path} was replaced (snapshot restore) while applying; "
                "nothing was written, the consumers restart from the restored positions"
            )
        if len(positions) == 1:
            self._conn.execute(_POSITION_UPSERT_SQL, next(iter(positions.items())))
        elif positions:
            self._conn.executemany(_POSITION_UPSERT_SQL, list(positions.items()))

    def _dead_letter_row(self, stream: str | None, seq: int | None, payload: bytes, reason: str) -> None:
        """Set one row aside inside an applying transaction; counted when it commits (the
        consumer counts whole messages it dead-letters, the runtime reports these)."""
        self._record_dead_letter(stream, seq, payload, reason)
        self._tx_counts["dead_lettered_rows"] += 1

    def _record_dead_letter(self, stream: str | None, seq: int | None, payload: bytes, reason: str) -> None:
        payload, reason = bounded_payload(payload, reason)
        self._conn.execute(
            f"INSERT INTO {quote_ident(DEAD_LETTER_TABLE)} (stream, seq, reason, payload, received_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (stream, seq, reason, payload, time.time()),
        )

    # -- schema --------------------------------------------------------------------------------

    def _refresh_schema(self) -> None:
        version = schema_version(self._conn)
        if version == self._schema_version:
            return
        self._layouts = {}
        for name in user_tables(self._conn):
            layout = table_layout(self._conn, name)
            if layout is not None:
                self._layouts[name.lower()] = layout
        self._trigger_guard.set_replicated(
            layout.name for layout in self._layouts.values() if layout.primary_key and self.selection.selects(layout.name)
        )
        self._plans = {}
        self._versions_ready = set()
        self._schema_version = version

    def _plan(self, row: RowChange) -> _RowPlan:
        return self._plan_for(row.table, row.columns, row.op)

    def _plan_for(self, table: str, columns: tuple[str, ...], op: str) -> _RowPlan:
        shape = (table, columns, op)
        plan = self._plans.get(shape)
        if plan is None:
            plan = self._plans[shape] = self._make_plan(table, columns, op)
        return plan

    def _make_plan(self, table_name: str, row_columns: tuple[str, ...], op: str) -> _RowPlan:
        layout = self._layouts.get(table_name.lower())
        if layout is None:
            if not self.selection.selects(table_name):
                return _RowPlan("ignore")
            return _RowPlan("park", reason=f"table {table_name!r} does not exist here")
        if not self.selection.selects(layout.name):
            return _RowPlan("ignore")
        if not layout.primary_key:
            return _RowPlan("ignore", reason=f"table {layout.name!r} has no primary key here")
        local_columns = {col.lower(): col for col in layout.columns}
        incoming = [col.lower() for col in row_columns]
        missing = [col for col, low in zip(row_columns, incoming) if low not in local_columns]
        if missing:
            return _RowPlan("park", reason=f"table {layout.name!r} lacks column(s) {', '.join(map(repr, missing))}")
        try:
            key_positions = [incoming.index(col.lower()) for col in layout.primary_key]
        except ValueError:
            return _RowPlan("park", reason=f"the change does not carry the primary key {layout.primary_key} of {layout.name!r}")
        if len(set(incoming)) != len(incoming):
            return _RowPlan("park", reason=f"the change names a column of {layout.name!r} twice")
        if layout.name not in self._versions_ready:
            if bk.ensure_versions_table(self._conn, layout):
                # Our own DDL: do not treat it as a schema change that invalidates the plans.
                self._schema_version = schema_version(self._conn)
            self._versions_ready.add(layout.name)

        n = len(row_columns)
        version_param, origin_param = n + 1, n + 2
        key_params = [p + 1 for p in key_positions]
        winner = bk.recorded_version_sql(layout.name, key_params, version_param, origin_param)
        # The unguarded statements name the version and origin parameters in a condition that
        # always holds (both are integers: the decoder checks), only because sqlite3 requires
        # every parameter of a row to be numbered in the statement.
        always = f"?{version_param} IS NOT NULL AND ?{origin_param} IS NOT NULL"
        table = quote_ident(layout.name)
        if op == "delete":
            match = " AND ".join(f"{quote_ident(col)} = ?{p}" for col, p in zip(layout.primary_key, key_params))
            apply_sql = f"DELETE FROM {table} WHERE {match} AND {winner}"
            unguarded_sql = f"DELETE FROM {table} WHERE {match} AND {always}"
            deleted = 1
        else:
            targets = ", ".join(quote_ident(local_columns[col]) for col in incoming)
            params = ", ".join(f"?{i + 1}" for i in range(n))
            key_set = {col.lower() for col in layout.primary_key}
            # Under a key collation other than BINARY ('alice' and 'Alice' are one key under
            # NOCASE) the conflict must also take the incoming key's spelling, or a case-only
            # rename never lands. With BINARY keys a conflict means the same key: leave it be
            # (rewriting a key column costs an index update per row).
            respell_key = any(collation.upper() != "BINARY" for collation in layout.pk_collations)
            updates = [f"{quote_ident(local_columns[col])} = excluded.{quote_ident(local_columns[col])}"
                       for col in incoming if respell_key or col not in key_set]
            # An upsert is a full row image: a column the writer's schema did not have yet (a
            # rolling ADD COLUMN) takes its default here too, as it does on the writer once it
            # migrates, so every node ends with the same row (docs/capture.md).
            carried = set(incoming)
            updates += [f"{quote_ident(col)} = ({default if default is not None else 'NULL'})"
                        for col, default in zip(layout.columns, layout.defaults or [None] * len(layout.columns))
                        if col.lower() not in carried]
            conflict = ", ".join(quote_ident(col) for col in layout.primary_key)
            on_conflict = f"DO UPDATE SET {', '.join(updates)}" if updates else "DO NOTHING"
            # INSERT ... SELECT needs a WHERE before ON CONFLICT (SQLite's upsert parsing rule);
            # ours is the version guard. Never INSERT OR REPLACE: it deletes rows on other
            # UNIQUE conflicts, resets absent columns and changes rowids.
            apply_sql = (
                f"INSERT INTO {table} ({targets}) SELECT {params} WHERE {winner} "
                f"ON CONFLICT ({conflict}) {on_conflict}"
            )
            # VALUES, not SELECT: SQLite runs INSERT ... SELECT through a co-routine, which
            # costs more per row than the guard's lookup itself.
            unguarded_sql = (
                f"INSERT INTO {table} ({targets}) VALUES ({params}) "
                f"ON CONFLICT ({conflict}) DO UPDATE SET {', '.join(updates)} WHERE {always}"
                if updates else ""
            )
            deleted = 0
        if len(key_positions) == 1:
            key_of = _single_key(key_positions[0])
        else:
            key_of = operator.itemgetter(*key_positions)
        # Unguarded apply needs "two rows are one key in the versions table" to imply "equal in
        # Python" (the duplicate check in _apply_groups): true for BINARY keys, not NOCASE/RTRIM.
        if any(collation.upper() != "BINARY" for collation in layout.pk_collations):
            unguarded_sql = ""
        return _RowPlan(
            "apply",
            table=layout.name,
            versions_sql=bk.versions_upsert_sql(layout.name, len(key_positions)),
            apply_sql=apply_sql,
            key_of=key_of,
            deleted=deleted,
            grouped_versions_sql=bk.versions_upsert_numbered_sql(
                layout.name, key_params, version_param, origin_param, deleted
            ),
            unguarded_sql=unguarded_sql,
            grouped_key=operator.itemgetter(*key_positions),
        )

    # -- rows ----------------------------------------------------------------------------------

    def _apply_groups(self, batch: GroupedBatch, outcome: ApplyOutcome, stream: str, seq: int) -> None:
        """Apply a GroupedBatch (inside the open transaction): two executemany per row group.

        Same statements and guarantees as _apply_rows; the row lists go to SQLite as they came
        out of the decoder. Rare cases (parked tables, a constraint error) take the per-row path.
        """
        conn = self._conn
        work: list[tuple[_RowPlan, list, list]] = []  # plan, rows to record versions of, rows to apply
        hold_above = self._limits.hold_above
        tombstone_horizon = self._tombstone_horizon
        for group in batch.groups:
            plan = self._plan_for(group.table, group.columns, group.op)
            if plan.action == "apply":
                version_of = _VERSION_OF[len(group.columns)]
                newest = max(map(version_of, group.params))
                if newest > hold_above:
                    # A row from beyond the allowed clock skew (rare): the per-row path holds it.
                    self._apply_rows(group.row_changes(), outcome, stream, seq)
                    continue
                recorded = group.params
                if min(map(version_of, recorded)) <= tombstone_horizon:
                    # Rows at or below the tombstone horizon are stale: their versions are not
                    # recorded (the row upsert's guard still sees what the table holds).
                    recorded = [params for params in recorded if version_of(params) > tombstone_horizon]
                work.append((plan, recorded, group.params))
                if newest > outcome.max_version:
                    outcome.max_version = newest
            elif plan.action == "park":
                self._apply_rows(group.row_changes(), outcome, stream, seq)
            else:
                outcome.rows_ignored += len(group.params)
        if not work:
            return
        conn.execute("SAVEPOINT marmot_batch")
        try:
            won = total = 0
            statements = []
            # All version records first (see _apply_rows), then the rows that won.
            for plan, recorded, params in work:
                group_won = max(conn.executemany(plan.grouped_versions_sql, recorded).rowcount, 0) if recorded else 0
                won += group_won
                total += len(params)
                statements.append(
                    plan.unguarded_sql if group_won == len(params) and self._keys_unique(plan, params, work)
                    else plan.apply_sql
                )
            for (_, _, params), statement in zip(work, statements):
                conn.executemany(statement, params)
        except sqlite3.Error as exc:
            rollback_to_savepoint(conn, "marmot_batch", exc)
            if is_busy_error(exc) or is_environment_error(exc):
                raise
            planned = []
            for group in batch.groups:
                plan = self._plan_for(group.table, group.columns, group.op)
                if plan.action == "apply":
                    planned.extend((row, plan) for row in group.row_changes())
            self._apply_one_by_one(planned, outcome, stream, seq)
            return
        conn.execute("RELEASE marmot_batch")
        outcome.rows_applied += won
        outcome.rows_stale += total - won

    @staticmethod
    def _keys_unique(plan: _RowPlan, params: list, work: list) -> bool:
        """Whether every row of a group whose versions upsert all won still holds its key's record.

        Each row then wrote its own (version, origin) into the versions table, and only a later
        row of the same key in this batch could have replaced it: none when the group's keys are
        distinct and no other group of the batch goes to the same table. Then the guard of the
        row statement holds for every row and can be left out (plan.unguarded_sql).
        """
        if not plan.unguarded_sql or sum(1 for other, _, _ in work if other.table == plan.table) != 1:
            return False
        keys = list(map(plan.grouped_key, params))
        return len(set(keys)) == len(keys)

    def _apply_rows(self, rows: Sequence[RowChange], outcome: ApplyOutcome, stream: str, seq: int) -> None:
        """Apply one batch's rows (inside the open transaction), parking/ignoring as planned."""
        conn = self._conn
        plans = self._plans
        # shape -> (plan, version params, apply params)
        groups: dict[tuple, tuple[_RowPlan, list, list]] = {}
        planned: list[tuple[RowChange, _RowPlan]] = []
        parked: list[tuple] = []
        held: list[tuple] = []
        limits = self._limits
        newest = 0
        for row in rows:
            shape = (row.table, row.columns, row.op)
            plan = plans.get(shape)
            if plan is None:
                plan = self._plan(row)
            if len(row.values) != len(row.columns):
                self._dead_letter_row(
                    stream, seq, encode_parked_change(row), f"malformed row for {row.table!r}: {len(row.columns)} columns but {len(row.values)} values"
                )
                outcome.rows_rejected += 1
                continue
            if plan.action == "ignore":
                outcome.rows_ignored += 1
                continue
            version = row.version
            if version > limits.hold_above:
                if self._hold_or_reject(row, stream, seq, held):
                    continue
                outcome.rows_rejected += 1
                continue
            if plan.action == "park":
                parked.append((row.table, plan.reason, encode_parked_change(row), stream, seq, time.time()))
                continue
            if version > newest:
                newest = version
            group = groups.get(shape)
            if group is None:
                group = groups[shape] = (plan, [], [])
            group[1].append((*plan.key_of(row.values), version, row.origin, plan.deleted, self._tombstone_horizon))
            group[2].append((*row.values, version, row.origin))
            planned.append((row, plan))
        if parked or held:
            self._store_waiting(parked, held, outcome)
        outcome.max_version = max(outcome.max_version, newest)
        if not groups:
            return
        conn.execute("SAVEPOINT marmot_batch")
        try:
            won = 0
            # All version records first: afterwards the versions tables name each key's winner,
            # also when one batch carries the same key twice (or two keys equal under NOCASE).
            for plan, version_params, _ in groups.values():
                won += max(conn.executemany(plan.versions_sql, version_params).rowcount, 0)
            for plan, _, apply_params in groups.values():
                conn.executemany(plan.apply_sql, apply_params)
        except sqlite3.Error as exc:
            rollback_to_savepoint(conn, "marmot_batch", exc)
            if is_busy_error(exc) or is_environment_error(exc):
                raise
            # Some row broke a constraint: go row by row so only the culprits are set aside.
            self._apply_one_by_one(planned, outcome, stream, seq)
            return
        conn.execute("RELEASE marmot_batch")
        outcome.rows_applied += won
        outcome.rows_stale += len(planned) - won

    # -- rows that wait: parked (schema) and held (clock skew) --------------------------------

    def _hold_or_reject(self, row: RowChange, stream: str | None, seq: int | None, held: list[tuple]) -> bool:
        """A row from beyond the allowed clock skew: queue it in `held` (True) or dead-letter it (False)."""
        limits = self._limits
        if not limits.hold_above < row.version <= limits.reject_above:
            ahead = limits.ahead_s(row.version) if 0 <= row.version else 0.0
            self._dead_letter_row(stream, seq, encode_parked_change(row), limits.reject_reason(row.version, row.origin))
            self._tx_counts[("skew", row.origin)] += 1
            self._skew_seen[row.origin] = max(self._skew_seen.get(row.origin, 0.0), ahead)
            return False
        held.append((
            row.table, limits.hold_reason(row.version, row.origin), encode_parked_change(row), stream, seq,
            limits.now_s, limits.due_at(row.version), row.origin, row.version,
        ))
        return True

    def _count_waiting(self) -> int:
        if self._waiting_count is None:
            self._waiting_count = int(self._conn.execute(
                f"SELECT (SELECT count(*) FROM {quote_ident(bk.PARKED_TABLE)}) "
                f"+ (SELECT count(*) FROM {quote_ident(bk.HELD_TABLE)})"
            ).fetchone()[0])
        return self._waiting_count

    def _store_waiting(self, parked: list[tuple], held: list[tuple], outcome: ApplyOutcome) -> None:
        """Insert parked and held rows, up to max_parked_rows in all; the overflow is dead-lettered."""
        room = max(0, self.max_parked_rows - self._count_waiting())
        overflow = [row for row in (parked + held)[room:]]
        if overflow:
            held = held[: max(0, room - len(parked))]
            parked = parked[:room]
            for table, reason, blob, stream, seq, *_ in overflow:
                self._dead_letter_row(
                    stream, seq, blob,
                    f"parked-row limit reached (replication.max_parked_rows {self.max_parked_rows}): {reason}",
                )
            self._tx_counts[("park_overflow",)] += len(overflow)
            outcome.rows_rejected += len(overflow)
        if parked:
            self._conn.executemany(_PARK_SQL, parked)
        if held:
            self._conn.executemany(_HOLD_SQL, held)
        self._waiting_count = self._count_waiting() + len(parked) + len(held)
        outcome.rows_parked += len(parked)
        outcome.rows_held += len(held)

    def _table_signature(self, table: str) -> tuple:
        layout = self._layouts.get(table.lower())
        if layout is None:
            return (None, self.selection.selects(table))
        return (layout.fingerprint, self.selection.selects(layout.name))

    def _retry_waiting(self, rows: list[tuple], *, held: bool) -> int:
        """Retry parked (held=False) or held rows inside the open transaction; returns how many left.

        Each row is checked again, clock first, then schema: a parked row from the future moves to
        the held table, a held row whose table or column is missing moves to the park.
        """
        conn = self._conn
        limits = self._limits
        source = bk.HELD_TABLE if held else bk.PARKED_TABLE
        done: list[tuple[int]] = []
        moved_to_park: list[tuple] = []
        moved_to_held: list[tuple] = []
        newest = 0
        for waiting_id, blob, stream, seq in rows:
            try:
                row = decode_parked_change(blob)
            except Exception as exc:  # noqa: BLE001 - a corrupt entry must not block the rest
                self._dead_letter_row(stream, seq, blob, f"unreadable parked row: {exc}")
                done.append((waiting_id,))
                continue
            plan = self._plan(row)
            if plan.action == "ignore":
                done.append((waiting_id,))
                continue
            if row.version > limits.hold_above:
                if held:
                    conn.execute(f"UPDATE {quote_ident(source)} SET due_at = ? WHERE id = ?",
                                 (limits.due_at(row.version), waiting_id))
                    continue
                done.append((waiting_id,))  # to the held table, or dead-lettered when absurd
                self._hold_or_reject(row, stream, seq, moved_to_held)
                continue
            if plan.action == "park":
                if held:
                    done.append((waiting_id,))
                    moved_to_park.append((row.table, plan.reason, blob, stream, seq, time.time()))
                continue
            done.append((waiting_id,))
            self._apply_one_by_one([(row, plan)], ApplyOutcome(stream=stream or "", seq=seq or 0))
            newest = max(newest, row.version)
        if done:
            conn.executemany(f"DELETE FROM {quote_ident(source)} WHERE id = ?", done)
        if moved_to_park:
            conn.executemany(_PARK_SQL, moved_to_park)
        if moved_to_held:
            conn.executemany(_HOLD_SQL, moved_to_held)
        left = len(done) - len(moved_to_park) - len(moved_to_held)
        if self._waiting_count is not None:
            self._waiting_count -= left
        self._finish_applying(newest, {})
        return left

    def _apply_one_by_one(
        self,
        planned: list[tuple[RowChange, _RowPlan]],
        outcome: ApplyOutcome,
        stream: str | None = None,
        seq: int | None = None,
    ) -> None:
        conn = self._conn
        for row, plan in planned:
            conn.execute("SAVEPOINT marmot_row")
            try:
                won = max(
                    conn.execute(
                        plan.versions_sql,
                        (*plan.key_of(row.values), row.version, row.origin, plan.deleted, self._tombstone_horizon),
                    ).rowcount,
                    0,
                )
                conn.execute(plan.apply_sql, (*row.values, row.version, row.origin))
            except sqlite3.Error as exc:
                rollback_to_savepoint(conn, "marmot_row", exc)
                if is_busy_error(exc) or is_environment_error(exc):
                    raise
                if (
                    isinstance(exc, sqlite3.IntegrityError)
                    and "UNIQUE constraint failed" in str(exc)
                    and not plan.deleted
                    and self._resolve_unique_conflict(row, plan, outcome)
                ):
                    continue
                self._dead_letter_row(
                    stream, seq, encode_parked_change(row), f"row rejected by SQLite on {plan.table!r}: {exc}"
                )
                outcome.rows_rejected += 1
                continue
            conn.execute("RELEASE marmot_row")
            outcome.rows_applied += won
            outcome.rows_stale += 1 - won
            outcome.max_version = max(outcome.max_version, row.version)

    def _resolve_unique_conflict(self, row: RowChange, plan: _RowPlan, outcome: ApplyOutcome) -> bool:
        """Settle an incoming row that collides with other rows on a non-primary-key UNIQUE index.

        Last writer wins across the colliding keys, as it does per key: if the incoming row is
        newer than every row it collides with, those rows are deleted and tombstoned with the
        incoming version (what `INSERT OR REPLACE` did on the origin, whose trigger-less delete
        never reached the log), then the row is applied. Otherwise the incoming row loses: its
        key is tombstoned with the winner's version and any local row of that key removed (the
        node where it was written does the same when the winner arrives). Every node decides
        from the same versions, so all converge on the same survivor. False when no colliding
        row is found (an index this cannot see: partial, expression, other collation) or the
        retry fails again: the caller dead-letters the row as before.
        """
        conn = self._conn
        layout = table_layout(conn, plan.table)
        if layout is None:
            return False
        values = {column.lower(): value for column, value in zip(row.columns, row.values)}
        key = tuple(plan.key_of(row.values))
        key_match = " AND ".join(f"{quote_ident(col)} = ?" for col in layout.primary_key)
        colliding: list[tuple] = []
        for index in unique_indexes(conn, layout.name):
            wanted = [values.get(column.lower()) for column in index.columns]
            if any(value is None for value in wanted):
                continue  # NULLs never collide (and a column the change lacks cannot be matched)
            match = " AND ".join(
                f"{quote_ident(column)} = ? COLLATE {quote_ident(collation)}"
                for column, collation in zip(index.columns, index.collations)
            )
            keys = ", ".join(quote_ident(col) for col in layout.primary_key)
            for found in conn.execute(
                f"SELECT {keys} FROM {quote_ident(layout.name)} WHERE {match} AND NOT ({key_match})",
                (*wanted, *key),
            ):
                if found not in colliding:
                    colliding.append(found)
        if not colliding:
            return False
        versions = quote_ident(bk.versions_table_name(layout.name))
        version_match = " AND ".join(f"{quote_ident(bk.key_column(i))} = ?" for i in range(len(key)))
        recorded = []
        for other in colliding:
            found = conn.execute(f"SELECT version, origin FROM {versions} WHERE {version_match}", other).fetchone()
            recorded.append(tuple(found) if found else (0, 0))  # never written since replication began
        tombstone_sql = bk.versions_upsert_sql(layout.name, len(key))
        delete_sql = f"DELETE FROM {quote_ident(layout.name)} WHERE {key_match}"
        strongest = max(recorded)
        conn.execute("SAVEPOINT marmot_unique")
        try:
            if (row.version, row.origin) > strongest:
                for other in colliding:
                    conn.execute(tombstone_sql, (*other, row.version, row.origin, 1, self._tombstone_horizon))
                    conn.execute(delete_sql, other)
                won = max(conn.execute(plan.versions_sql, (*key, row.version, row.origin, 0, self._tombstone_horizon)).rowcount, 0)
                conn.execute(plan.apply_sql, (*row.values, row.version, row.origin))
                outcome.rows_applied += won
                outcome.rows_stale += 1 - won
            else:
                conn.execute(tombstone_sql, (*key, *strongest, 1, self._tombstone_horizon))
                conn.execute(delete_sql, key)
                outcome.rows_stale += 1
        except sqlite3.Error as exc:
            rollback_to_savepoint(conn, "marmot_unique", exc)
            if is_busy_error(exc) or is_environment_error(exc):
                raise
            return False
        conn.execute("RELEASE marmot_unique")
        outcome.max_version = max(outcome.max_version, row.version, strongest[0])
        return True
