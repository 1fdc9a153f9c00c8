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

This module holds the transaction frame, positions and the public entry points; the parts that
write inside the transaction live beside it: apply_plan.py (statements per row shape),
apply_rows.py (steps 3 and 4), unique_collisions.py, parked_rows.py (parked and held rows) and
own_origin_horizon.py; apply_transaction.py is what they share.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from marmot_appliance.errors import DatabaseStateError, MarmotError
from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication import codec, fragments
from marmot_appliance.replication.apply_plan import RowPlanner
from marmot_appliance.replication.apply_rows import RowWriter
from marmot_appliance.replication.apply_transaction import (
    ApplyOutcome,
    ApplyTransaction,
    CountKey,
    record_dead_letter,
)
from marmot_appliance.replication.clock_bound import clock_limits
from marmot_appliance.replication.codec import GroupedBatch
from marmot_appliance.replication.own_origin_horizon import (
    all_newer,
    ensure_own_origin_horizon,
    own_origin_horizon,
    reset_own_origin_horizon,
)
from marmot_appliance.replication.parked_retry import ParkedRetry
from marmot_appliance.replication.parked_rows import (
    ParkedRows,
    WaitingReport,
    decode_parked_change,
    encode_parked_change,
)
from marmot_appliance.replication.sqlite_util import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DatabaseBusyError,
    connect,
    is_environment_error,
    quote_ident,
    read_transaction,
    write_transaction,
)
from marmot_appliance.replication.trigger_guard import AppTriggerGuard
from marmot_appliance.replication.types import DEAD_LETTER_TABLE, POSITIONS_TABLE, ChangeBatch
from marmot_appliance.spec.model import ReplicationSettings, TableSelection

# Importers use this module's names; the ones defined beside it are re-exported here.
__all__ = [
    "ApplyOutcome",
    "BatchApplier",
    "DatabaseReplacedError",
    "DatabaseBusyError",
    "WaitingReport",
    "decode_parked_change",
    "encode_parked_change",
    "reset_own_origin_horizon",
]

DEFAULT_MAX_CLOCK_SKEW_S = ReplicationSettings.max_clock_skew_s
DEFAULT_MAX_PARKED_ROWS = ReplicationSettings.max_parked_rows
# Parked or held rows retried per transaction: the write lock is held for one chunk at a time.
RETRY_CHUNK_ROWS = 500

# Per-transaction statements, built once.
_MARKER_ON_SQL = f"INSERT OR IGNORE INTO {quote_ident(bk.MARKER_TABLE)} (id) VALUES (1)"
_MARKER_OFF_SQL = f"DELETE FROM {quote_ident(bk.MARKER_TABLE)}"
_POSITIONS_SQL = f"SELECT stream, seq FROM {quote_ident(POSITIONS_TABLE)}"
# No max(): positions only ever move forward because every caller writes a sequence above the
# stored one (apply_many drops duplicates), and the fence below, not max(), keeps a position from
# before a restore out of the restored file.
_POSITION_UPSERT_SQL = (
    f"INSERT INTO {quote_ident(POSITIONS_TABLE)} (stream, seq) VALUES (?, ?) "
    "ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq"
)


class DatabaseReplacedError(MarmotError):
    """The file was replaced (a snapshot restore) since this applier adopted it.

    Nothing was written. Not transient and not the message's fault: never retry or dead-letter
    it; stop applying until the runtime has adopted the file (`adopt_database`) and restarted
    the consumers from the positions the file now holds.
    """


@contextlib.contextmanager
def _environment_errors(db_path: Path) -> Iterator[None]:
    """Disk full, read-only file, corruption: the database's problem, not the message's."""
    try:
        yield
    except sqlite3.Error as exc:
        if is_environment_error(exc):
            raise DatabaseStateError(f"database {db_path} cannot be written: {exc}") from exc
        raise


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
        self._counts: Counter[CountKey] = Counter()  # ("skew", origin) / ("park_overflow",) / ... since start
        self._conn = connect(
            self.db_path, busy_timeout_ms=busy_timeout_ms, synchronous_normal=True, cache_mib=64, temp_store_memory=True
        )
        # The application's triggers must not write replicated tables again on apply (their
        # effects arrive as captured changes) but must keep maintaining derived state.
        trigger_guard = AppTriggerGuard()
        trigger_guard.install(self._conn)
        # The parts that write inside an applying transaction, sharing its state through _tx.
        self._tx = ApplyTransaction(self._conn, clock_limits(self.max_clock_skew_s))
        self._planner = RowPlanner(self._conn, self.selection, trigger_guard)
        self._parked = ParkedRows(self._tx, self.max_parked_rows)
        self._rows = RowWriter(self._tx, self._planner, self._parked)
        self._retry = ParkedRetry(
            self._tx, self._planner, self._parked, self._rows, self._applying, self._finish_applying
        )
        with write_transaction(self._conn):
            bk.ensure_bookkeeping(self._conn)
            ensure_own_origin_horizon(self._conn)
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
            self._planner.forget_schema()  # the restored file has its own schema: re-read it
            # Its parked and held rows are not the ones we knew: count and retry them afresh.
            self._parked.forget_count()
            self._retry.forget()
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
                own_horizon = 0  # only read for an own-origin batch
                if batch.origin == self.node_id:
                    outcome.own_origin = True
                    if horizon is None:
                        horizon = own_origin_horizon(conn)
                    own_horizon = horizon
                if isinstance(batch, GroupedBatch):
                    if batch.origin != self.node_id:
                        self._rows.apply_groups(batch, outcome, stream, int(seq))
                        newest = max(newest, outcome.max_version)
                        continue
                    # Our own batch: the consumer decodes it when the stream delivered it before
                    # the publisher's ack named its sequence (16% of node 1's rows in one bench run).
                    # Usually every row is newer than the horizon: skip it without row objects.
                    if all_newer(batch, own_horizon):
                        continue
                    batch = batch.to_change_batch()  # rare: our own batch from an earlier life
                rows = batch.rows
                if batch.origin == self.node_id:
                    # Own rows newer than the horizon were written into this very file.
                    rows = tuple(row for row in rows if row.version <= own_horizon)
                    if not rows:
                        continue
                self._rows.apply_rows(rows, outcome, stream, int(seq))
                newest = max(newest, outcome.max_version)
            self._finish_applying(newest, {o.stream: stored[o.stream] for o in outcomes if not o.duplicate})
        return outcomes

    def dead_letter(self, stream: str, seq: int, payload: bytes, reason: str) -> None:
        """Record an unusable message and move the stream position past it, in one transaction."""
        with write_transaction(self._conn):
            record_dead_letter(self._conn, stream, seq, payload, reason)
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
        """Queue the tables whose parked rows may apply now; True when there is any (ParkedRetry.start)."""
        return self._retry.start()

    def retry_parked_chunk(self, chunk_rows: int = RETRY_CHUNK_ROWS) -> tuple[int, bool]:
        """One transaction of the queued retry: (rows that left the park, whether it is done)."""
        return self._retry.parked_chunk(chunk_rows)

    def retry_held(self, chunk_rows: int = RETRY_CHUNK_ROWS) -> int:
        """Apply held rows whose version the clock has caught up with. Returns how many left."""
        return self._retry.held(chunk_rows)

    def waiting_report(self) -> WaitingReport:
        now = clock_limits(self.max_clock_skew_s)
        with read_transaction(self._conn):
            return self._parked.report(self._counts, now)

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
        self._tx.counts = Counter()
        try:
            with _environment_errors(self.db_path), write_transaction(self._conn):
                self._begin_applying()
                yield self._conn
        except BaseException:
            self._parked.forget_count()  # parked/held rows of this transaction rolled back: recount
            raise
        self._counts.update(self._tx.counts)

    def _begin_applying(self) -> None:
        conn = self._conn
        self._tx.limits = clock_limits(self.max_clock_skew_s)
        conn.execute(_MARKER_ON_SQL)
        self._planner.refresh()
        bk.fold_pending(conn)
        self._tx.tombstone_horizon = bk.tombstone_horizon(conn)

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
