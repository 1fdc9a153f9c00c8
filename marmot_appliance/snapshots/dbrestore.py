"""The restore side in SQLite: make a downloaded copy this node's, then back it up into the live file.

Never a file copy: the live database is only written through SQLite's online backup API, which
takes the database's write lock and replaces its pages inside one transaction. Readers in other
processes keep reading their consistent old view until they start a new transaction (in WAL mode
they are never blocked); writers wait on the lock (SQLITE_BUSY after their busy_timeout), and
nobody ever sees a half-restored file.

Before that, the copy is adjusted for the restoring node (what identifies "self" must never
come from the snapshot):
  * the saving node's unpublished capture log is folded and removed;
  * `_marmot_meta.node_id` is set to this node's id;
  * the clock is raised to max(snapshot clock, this node's clock), so a later local write still
    outranks every version this node has seen or issued;
  * every shard stream gets a position row (0 when the snapshot never applied it), so the node
    counts as replicated from now on and replays exactly from the snapshot's positions;
  * tables this node does not replicate (its `tables.exclude` / not in `include`) are local
    data: their current contents are carried over from the live database instead;
  * a new database epoch is written: an apply that began before the restore can then not write
    its position into the restored file (the applier's fence, see replication/applier.py).
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Callable

from marmot_appliance.errors import DatabaseStateError
from marmot_appliance.replication.bookkeeping import (
    CLOCK_TABLE,
    META_DATABASE_EPOCH,
    META_NODE_ID,
    META_TABLE,
    object_exists,
)
from marmot_appliance.replication.introspect import user_tables
from marmot_appliance.replication.sqlite_defensive import enable_defensive
from marmot_appliance.replication.sqlite_util import quote_ident
from marmot_appliance.replication.types import BOOKKEEPING_PREFIX, POSITIONS_TABLE
from marmot_appliance.snapshots.dbcopy import strip_node_private_state
from marmot_appliance.snapshots.errors import RestoreRefusedError, SnapshotError
from marmot_appliance.snapshots.local_state import BUSY_TIMEOUT_S, open_readonly, read_clock
from marmot_appliance.spec.model import TableSelection

log = logging.getLogger(__name__)

META_OWN_ORIGIN_HORIZON = "own_origin_horizon"  # see replication/own_origin_horizon.py
BACKUP_STEP_PAGES = 1024  # pages per backup step: progress granularity, lock is held throughout
SQLITE_OK = 0


def _sqlite_uri_ro(path: Path) -> str:
    return path.resolve().as_uri() + "?mode=ro"


def prepare_copy_for_node(
    copy_path: Path,
    db_path: Path,
    node_id: int,
    streams: list[str],
    selection: TableSelection,
    install_capture: bool = True,
) -> None:
    """Adjust the downloaded copy (never the live file) so it becomes this node's database."""
    check_untrusted_copy(copy_path, db_path, selection)
    # uri=True so the ATTACH below understands the read-only `file:` URI of the live database.
    copy = sqlite3.connect(copy_path.resolve().as_uri(), uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        _distrust_schema(copy)
        strip_node_private_state(copy)
        local_clock = 0
        live_exists = db_path.exists() and db_path.stat().st_size > 0
        if live_exists:
            live = open_readonly(db_path)
            try:
                local_clock = read_clock(live)
            finally:
                live.close()
        if live_exists:
            # ATTACH is refused inside a transaction, so it brackets the transaction.
            copy.execute("ATTACH DATABASE ? AS live", (_sqlite_uri_ro(db_path),))
        copy.execute("BEGIN IMMEDIATE")
        try:
            if object_exists(copy, CLOCK_TABLE):
                copy.execute(f"UPDATE {quote_ident(CLOCK_TABLE)} SET hlc = max(hlc, ?)", (local_clock,))
            had_meta = object_exists(copy, META_TABLE)
            copy.execute(f"CREATE TABLE IF NOT EXISTS {quote_ident(META_TABLE)} (key TEXT PRIMARY KEY, value)")
            copy.execute(
                f"INSERT INTO {quote_ident(META_TABLE)} (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (META_DATABASE_EPOCH, uuid.uuid4().hex),
            )
            if had_meta:
                clock = read_clock(copy)
                for key, value in (
                    (META_NODE_ID, node_id),
                    # Every own write up to now may be missing from this file: the applier must
                    # apply (version-checked) this node's own rows on replay, not skip them.
                    (META_OWN_ORIGIN_HORIZON, max(int(time.time() * 1000) << 16, clock)),
                ):
                    copy.execute(
                        f"INSERT INTO {quote_ident(META_TABLE)} (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (key, value),
                    )
            copy.execute(
                f"CREATE TABLE IF NOT EXISTS {quote_ident(POSITIONS_TABLE)} "
                "(stream TEXT PRIMARY KEY, seq INTEGER NOT NULL)"
            )
            copy.executemany(
                f"INSERT OR IGNORE INTO {quote_ident(POSITIONS_TABLE)} (stream, seq) VALUES (?, 0)",
                [(s,) for s in streams],
            )
            if live_exists:
                _carry_over_local_tables(copy, selection)
            copy.execute("COMMIT")
        except BaseException:
            copy.execute("ROLLBACK")
            raise
        if live_exists:
            copy.execute("DETACH DATABASE live")
            _match_page_size(copy, db_path)
        capture_present = object_exists(copy, CLOCK_TABLE)
    finally:
        copy.close()
    if install_capture:
        # Also when the snapshot was saved before any capture existed: without this node's
        # triggers, an application write between the restore and the node's next start would
        # never be logged (tests/test_restore_without_capture.py).
        _install_own_capture(copy_path, node_id, selection)
        if not capture_present and local_clock:
            _raise_clock(copy_path, local_clock)  # this node's next versions stay above its last ones


def _distrust_schema(conn: sqlite3.Connection) -> None:
    """A snapshot is untrusted input: its schema (views, triggers, defaults) may not call
    functions with side effects, and defensive mode forbids writing the schema or shadow tables
    directly (replication/sqlite_defensive.py). A connection that cannot be made defensive is
    refused rather than used without it."""
    conn.execute("PRAGMA trusted_schema = OFF")
    if not enable_defensive(conn):
        raise SnapshotError("cannot turn on SQLite's defensive mode for the downloaded snapshot; not restoring it")


def _schema_objects(conn: sqlite3.Connection, schema: str, selection: TableSelection) -> dict[tuple[str, str], str]:
    """(type, name) -> SQL of the application's objects on tables this node replicates.
    The appliance's own objects (`_marmot_*`, e.g. the capture triggers) are rebuilt locally and
    tables this node does not replicate are carried over from the live file, so neither counts."""
    rows = conn.execute(
        f"SELECT type, name, tbl_name, sql FROM {quote_ident(schema)}.sqlite_schema WHERE sql IS NOT NULL"
    ).fetchall()
    return {
        (kind, name): " ".join(sql.split())
        for kind, name, table, sql in rows
        if not name.startswith((BOOKKEEPING_PREFIX, "sqlite_"))
        and not table.startswith((BOOKKEEPING_PREFIX, "sqlite_"))
        and selection.selects(table)
    }


def check_untrusted_copy(copy_path: Path, db_path: Path, selection: TableSelection) -> None:
    """Check a downloaded snapshot before anything runs on it read-write.

    Opened read-only with trusted_schema=OFF: SQLite's quick_check, then its schema against the
    live database's — a snapshot whose tables, indexes, triggers or views differ from ours
    (extra triggers included) is refused before the backup could make them this node's. A node
    whose database has no tables yet takes the snapshot's schema (checked only by the manifest
    checksum, which only node identities can write)."""
    copy = sqlite3.connect(_sqlite_uri_ro(copy_path), uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        _distrust_schema(copy)
        check = copy.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise SnapshotError(f"the downloaded snapshot fails SQLite's quick_check: {check}")
        if not (db_path.exists() and db_path.stat().st_size > 0):
            return
        copy.execute("ATTACH DATABASE ? AS live", (_sqlite_uri_ro(db_path),))
        theirs = _schema_objects(copy, "main", selection)
        ours = _schema_objects(copy, "live", selection)
    finally:
        copy.close()
    if not ours:
        return
    differences = sorted(
        f"{kind} {name}: " + ("only in the snapshot" if key not in ours else "only here" if key not in theirs else "differs")
        for key in set(theirs) | set(ours)
        if theirs.get(key) != ours.get(key)
        for kind, name in [key]
    )
    if differences:
        raise RestoreRefusedError(
            "the snapshot's schema differs from this database's, so it is not restored: "
            + "; ".join(differences[:10])
            + (f" (and {len(differences) - 10} more)" if len(differences) > 10 else "")
            + ". Bring the schemas in line (schema changes are not replicated), then restore."
        )


def refresh_own_clock(copy_path: Path, db_path: Path) -> None:
    """Before another backup attempt: raise the copy's clock and own-origin horizon again.

    A backup abandoned because local changes appeared is retried after they were published. Those
    rows were written after prepare_copy_for_node set the horizon; left below it, replay would
    skip them as "already in this file" (they are not: the file is replaced) and a later local
    write could rank below them. Nothing commits in between that is not caught: the publisher is
    paused and any new change is pending, which abandons the next attempt too.
    """
    live = open_readonly(db_path)
    try:
        local_clock = read_clock(live)
    finally:
        live.close()
    copy = sqlite3.connect(copy_path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        _distrust_schema(copy)
        copy.execute("BEGIN IMMEDIATE")
        try:
            if object_exists(copy, CLOCK_TABLE):
                copy.execute(f"UPDATE {quote_ident(CLOCK_TABLE)} SET hlc = max(hlc, ?)", (local_clock,))
            horizon = max(int(time.time() * 1000) << 16, read_clock(copy), local_clock)
            copy.execute(
                f"UPDATE {quote_ident(META_TABLE)} SET value = max(value, ?) WHERE key = ?",
                (horizon, META_OWN_ORIGIN_HORIZON),
            )
            copy.execute("COMMIT")
        except BaseException:
            copy.execute("ROLLBACK")
            raise
    finally:
        copy.close()


def _raise_clock(copy_path: Path, clock: int) -> None:
    conn = sqlite3.connect(copy_path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        if object_exists(conn, CLOCK_TABLE):
            conn.execute(f"UPDATE {quote_ident(CLOCK_TABLE)} SET hlc = max(hlc, ?)", (clock,))
    finally:
        conn.close()


def _install_own_capture(copy_path: Path, node_id: int, selection: TableSelection) -> None:
    """Triggers for *this* node's table selection, in place before the copy goes live.

    The snapshot carries the saving node's triggers, which follow its include/exclude; had we
    left them, a write landing between the restore and the runtime's own install could be
    captured for a table this node does not replicate.
    """
    try:
        from marmot_appliance.replication.capture import ChangeCapture
    except ImportError:  # capture not available: the runtime installs it at start anyway
        return
    capture = ChangeCapture(copy_path, node_id, selection)
    try:
        capture.install()
    finally:
        capture.close()


def _carry_over_local_tables(copy: sqlite3.Connection, selection: TableSelection) -> None:
    """Tables this node does not replicate keep their live contents (they are local data).

    Runs inside the caller's transaction with the live database attached read-only as `live`.
    """
    live_tables = [
        name
        for (name,) in copy.execute("SELECT name FROM live.sqlite_schema WHERE type = 'table'")
        if not name.startswith(BOOKKEEPING_PREFIX) and not name.startswith("sqlite_")
    ]
    local_only = [name for name in live_tables if not selection.selects(name)]
    for name in local_only:
        objects = [
            (kind, sql)
            for kind, object_name, sql in copy.execute(
                "SELECT type, name, sql FROM live.sqlite_schema WHERE tbl_name = ? AND sql IS NOT NULL "
                "AND type IN ('table', 'index', 'trigger')",
                (name,),
            )
            if not object_name.startswith(BOOKKEEPING_PREFIX)
        ]
        copy.execute(f"DROP TABLE IF EXISTS main.{quote_ident(name)}")
        for kind, sql in objects:
            if kind == "table":
                copy.execute(sql)
        columns = [
            quote_ident(row[1])
            for row in copy.execute(f"PRAGMA live.table_xinfo({quote_ident(name)})")
            if row[6] == 0  # hidden 2/3 are generated columns: computed, not inserted
        ]
        column_list = ", ".join(columns)
        copy.execute(
            f"INSERT INTO main.{quote_ident(name)} ({column_list}) SELECT {column_list} FROM live.{quote_ident(name)}"
        )
        for kind, sql in objects:
            if kind != "table":
                copy.execute(sql)
    for name in user_tables(copy):
        if not selection.selects(name) and name not in live_tables:
            # The saving node's local-only rows are not ours to take; the table itself may be
            # expected by the application, so its schema stays.
            copy.execute(f"DELETE FROM main.{quote_ident(name)}")
    if local_only:
        log.info("restore keeps this node's local tables: %s", ", ".join(local_only))


def _match_page_size(copy: sqlite3.Connection, db_path: Path) -> None:
    """The backup API cannot change the page size of a WAL database: convert the copy instead."""
    live = open_readonly(db_path)
    try:
        wanted = int(live.execute("PRAGMA page_size").fetchone()[0])
    finally:
        live.close()
    current = int(copy.execute("PRAGMA page_size").fetchone()[0])
    if current != wanted:
        log.info("converting snapshot copy from page size %d to %d", current, wanted)
        copy.execute("PRAGMA journal_mode = DELETE")
        copy.execute(f"PRAGMA page_size = {int(wanted)}")
        copy.execute("VACUUM")


class _PendingAppeared(Exception):
    def __init__(self, count: int):
        self.count = count


def backup_into_live(
    copy_path: Path,
    db_path: Path,
    pending_now: Callable[[], int],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Replace the live database's contents with the copy's, through the online backup API.

    `pending_now()` is called once the backup holds the live database's write lock (after the
    first step, before anything is committed): if local changes were committed and not
    published since the caller last flushed, the backup is abandoned (rolled back) and
    RestoreRefusedError tells the caller to flush again. Nothing can commit in between, because
    the lock is ours.
    """
    if not db_path.exists():
        fresh = sqlite3.connect(db_path)
        try:
            fresh.execute("PRAGMA journal_mode = WAL")
        finally:
            fresh.close()
    source = sqlite3.connect(_sqlite_uri_ro(copy_path), uri=True)
    dest = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        page_size = int(source.execute("PRAGMA page_size").fetchone()[0])
        total_pages = int(source.execute("PRAGMA page_count").fetchone()[0])
        # Strictly fewer pages than the total in the first step, so the check below runs while
        # the transaction is still open (a step that copies everything commits at once).
        step = max(1, min(BACKUP_STEP_PAGES, total_pages - 1))
        checked = False

        def on_step(status: int, remaining: int, total: int) -> None:
            nonlocal checked
            if status != SQLITE_OK:
                return  # busy/locked: the write lock is not ours yet, sqlite3 retries
            if not checked:
                count = pending_now()
                if count:
                    raise _PendingAppeared(count)
                checked = True
            if progress is not None:
                progress((total - remaining) * page_size)

        try:
            source.backup(dest, pages=step, progress=on_step, sleep=0.05)
        except _PendingAppeared as exc:
            raise RestoreRefusedError(
                f"{exc.count} local change(s) were committed while the restore was starting and are "
                "not published yet; the restore was abandoned and nothing was changed"
            ) from None
        except sqlite3.Error as exc:
            raise DatabaseStateError(f"restoring into {db_path} failed (nothing was changed): {exc}") from exc
        if progress is not None:
            progress(total_pages * page_size)
        try:
            dest.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # a checkpoint is an optimisation; readers may hold it off
            log.debug("checkpoint after restore deferred: %s", exc)
    finally:
        dest.close()
        source.close()
