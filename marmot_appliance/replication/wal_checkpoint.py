"""One connection checkpoints the WAL for the whole node runtime, off the apply path.

SQLite's default is that whichever connection commits past `wal_autocheckpoint` pages (1,000)
runs the checkpoint right there, inside its commit: an apply or a publish round then waits for
a thousand page copies and an fsync, and every message queued behind it waits too (the p99 of
commit-to-visible). The runtime's connections open with `wal_autocheckpoint = 0`
(replication/sqlite_util.connect), and this one connection, on a thread of its own, runs
`PRAGMA wal_checkpoint(PASSIVE)` every CHECKPOINT_INTERVAL_S: PASSIVE never waits for readers
or writers, it copies what it can.

It also narrows SQLite's "WAL-reset" race (a rare corruption when two connections checkpoint
back to back while a third commits; fixed in SQLite 3.51.3, Debian 12 ships 3.40.1): of the
runtime's connections only this one ever checkpoints. The application's own connections keep
SQLite's default (docs/replication.md, "WAL checkpoints").
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from marmot_appliance.replication.sqlite_util import connect, is_busy_error

CHECKPOINT_INTERVAL_S = 1.0


@dataclass(frozen=True)
class WalState:
    """What one checkpoint saw: WAL frames in the log, and how many of them are in the database file."""

    frames: int
    checkpointed: int
    blocked: bool  # another connection held a lock the checkpoint needed (it did what it could)


class WalCheckpointer:
    """Runs PASSIVE checkpoints on its own connection (one thread calls it: node/runtime.py)."""

    def __init__(self, db_path: str | Path):
        self.db_path = db_path
        self._conn: sqlite3.Connection | None = None

    def checkpoint(self) -> WalState:
        if self._conn is None:
            self._conn = connect(self.db_path, checkpoints=True)
        try:
            row = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError as exc:
            if is_busy_error(exc):
                return WalState(0, 0, blocked=True)
            raise
        busy, frames, checkpointed = (int(value) for value in row)
        # -1 / -1: the database is not in WAL mode (the runtime refuses those; a restore in
        # progress never changes it), nothing to report.
        return WalState(max(frames, 0), max(checkpointed, 0), blocked=bool(busy))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
