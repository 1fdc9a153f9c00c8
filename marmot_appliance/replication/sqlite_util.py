"""Small SQLite helpers shared by capture, applier and digest: quoting, connections, transactions.

Every connection here runs in autocommit mode (`isolation_level=None`) so transactions are
explicit (`BEGIN IMMEDIATE` for writes: take the write lock up front, wait `busy_timeout` for it,
and never upgrade a read transaction into a write one half way, which is where SQLITE_BUSY
deadlocks come from).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from marmot_appliance.errors import DatabaseStateError, TransientError

DEFAULT_BUSY_TIMEOUT_MS = 5000

# sqlite3 primary result codes (extended codes keep these in the low byte).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6


class DatabaseBusyError(TransientError):
    """The database stayed locked by another writer past busy_timeout. Transient: retry later.

    Callers (publisher, consumer) retry these with bounded backoff; nothing was changed.
    """


def quote_ident(name: str) -> str:
    """Quote an SQL identifier: wrap in double quotes, double any embedded double quote."""
    return '"' + name.replace('"', '""') + '"'


def quote_text(value: str) -> str:
    """Quote a string literal (only for DDL, where parameters cannot be bound)."""
    return "'" + value.replace("'", "''") + "'"


# Errors about the database or the machine, not about the data being written: retrying or
# alerting is right, dead-lettering the message would lose it for nothing.
_ENVIRONMENT_CODES = frozenset({7, 8, 10, 11, 13, 14, 26})  # NOMEM READONLY IOERR CORRUPT FULL CANTOPEN NOTADB


def is_environment_error(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in _ENVIRONMENT_CODES


def is_busy_error(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (_SQLITE_BUSY, _SQLITE_LOCKED)
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def connect(
    db_path: str | Path,
    *,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    readonly: bool = False,
    synchronous_normal: bool = False,
    cache_mib: int | None = None,
    temp_store_memory: bool = False,
    checkpoints: bool = False,
) -> sqlite3.Connection:
    """Open an existing database (never create one: a typo in a path must not make an empty db).

    A writable connection never checkpoints the WAL on its own (`wal_autocheckpoint = 0`) unless
    `checkpoints`: the node runtime checkpoints from one connection of its own, off the apply
    path (replication/wal_checkpoint.py). A command that runs without a node still leaves a
    checkpointed file: SQLite checkpoints when the last connection to the database closes.

    check_same_thread=False because the async runtime calls in through asyncio.to_thread; one
    connection is still used by one caller at a time.
    """
    path = Path(db_path)
    if not path.exists():
        raise DatabaseStateError(f"database {path} does not exist")
    mode = "ro" if readonly else "rw"
    uri = f"{path.resolve().as_uri()}?mode={mode}"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if not readonly and not checkpoints:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        if synchronous_normal:
            # WAL + NORMAL: a commit survives a process crash; only a power cut can lose the
            # last commits, and then rows and stream positions roll back together (same
            # transaction), so the streams simply replay them. Saves an fsync per batch.
            conn.execute("PRAGMA synchronous = NORMAL")
        if cache_mib:
            # The replication connections touch every table, its key index and its versions
            # table per row: with SQLite's default 2 MiB page cache a large table keeps
            # re-reading pages (about 20% of apply time at 200k rows). Allocated as used.
            conn.execute(f"PRAGMA cache_size = {-1024 * int(cache_mib)}")
        if temp_store_memory:
            # A savepoint keeps a sub-journal of the pages it changes, and SQLite spills it to
            # a temporary file past 64 KiB: one file per transaction, written page by page
            # (83,000 pwrite calls for 30,000 applied rows, against 10,000 in memory). In memory
            # it holds one savepoint's pages: one message group, one retire run.
            conn.execute("PRAGMA temp_store = MEMORY")
        # Cheap sanity read: a file that is not SQLite fails here with a clear message.
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    except sqlite3.DatabaseError as exc:
        raise DatabaseStateError(f"cannot open database {path}: {exc}") from exc
    return conn


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; busy errors become DatabaseBusyError."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if is_busy_error(exc):
            raise DatabaseBusyError(f"database is locked by another writer: {exc}") from exc
        raise
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError) and is_busy_error(exc):
            raise DatabaseBusyError(f"database is locked by another writer: {exc}") from exc
        raise


def rollback_to_savepoint(conn: sqlite3.Connection, name: str, error: BaseException) -> None:
    """Undo to savepoint `name` and release it, after `error` stopped the work inside it.

    After SQLITE_FULL, an I/O error or NOMEM, SQLite may already have rolled back the whole
    transaction: the savepoint is gone and `ROLLBACK TO` would fail with "no such savepoint",
    hiding the real error behind one that looks like the message's fault (it was then
    dead-lettered). In that case, and if the rollback itself fails, `error` is raised: nothing
    of the transaction is left to continue with.
    """
    if not conn.in_transaction:
        raise error
    try:
        conn.execute(f"ROLLBACK TO {quote_ident(name)}")
        conn.execute(f"RELEASE {quote_ident(name)}")
    except sqlite3.Error:
        raise error from None


@contextlib.contextmanager
def read_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A consistent read snapshot over several statements (WAL readers never block writers)."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


def journal_mode(conn: sqlite3.Connection) -> str:
    return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA schema_version").fetchone()[0])
