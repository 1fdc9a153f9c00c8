"""The own-origin horizon: from when on this database file holds every write this node made.

A batch this node published is skipped when it comes back from a stream, since its rows are
already in the file, except rows at or below this horizon: the moment the file started
recording this node's writes (first install, or a restore or replacement of the file). Older own
rows may be missing from the file, so the applier applies them with the usual version checks.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.apply_plan import version_of
from marmot_appliance.replication.codec import GroupedBatch
from marmot_appliance.replication.sqlite_util import DEFAULT_BUSY_TIMEOUT_MS, connect, write_transaction

META_OWN_ORIGIN_HORIZON = "own_origin_horizon"


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
            return set_horizon_now(conn)
    finally:
        conn.close()


def own_origin_horizon(conn: sqlite3.Connection) -> int:
    """The stored horizon (0 when none was ever set)."""
    stored = bk.get_meta(conn, META_OWN_ORIGIN_HORIZON, 0) or 0
    if not isinstance(stored, int | float | str | bytes):
        raise TypeError(f"{META_OWN_ORIGIN_HORIZON} holds {stored!r}, not a number")
    return int(stored)


def ensure_own_origin_horizon(conn: sqlite3.Connection) -> None:
    """Set the horizon to now unless the file has one (inside the caller's write transaction)."""
    if bk.get_meta(conn, META_OWN_ORIGIN_HORIZON) is None:
        set_horizon_now(conn)


def set_horizon_now(conn: sqlite3.Connection) -> int:
    horizon = max(_now_version(), bk.current_clock(conn))
    bk.set_meta(conn, META_OWN_ORIGIN_HORIZON, horizon)
    # Every later local write must rank above the horizon: in the same millisecond the trigger's
    # max(now_ms << 16, hlc + 1) could otherwise land exactly on it and count as "older".
    bk.advance_clock(conn, horizon)
    return horizon


def all_newer(batch: GroupedBatch, horizon: int) -> bool:
    """Whether every row of the batch has a version above `horizon`."""
    return all(min(map(version_of(len(group.columns)), group.params)) > horizon
               for group in batch.groups if group.params)


def _now_version() -> int:
    return int(time.time() * 1000) << 16
