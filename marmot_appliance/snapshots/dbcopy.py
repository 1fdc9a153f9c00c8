"""The save side in SQLite: a consistent copy of the live database, made portable.

`VACUUM INTO` copies the database inside one read transaction, so the rows and the applied
positions in `_marmot_positions` are from the same instant: the snapshot reflects exactly the
stream prefix its positions name. It only reads the live file (WAL readers never block
writers) and writes a compact, defragmented copy.

The copy is then cleaned of what belongs to the saving node only: its capture log (changes it
had not published yet; they reach the stream on their own and are replayed from there), after
folding their versions into the per-row versions tables so the copy's versions describe its
rows exactly.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from marmot_appliance.errors import DatabaseStateError
from marmot_appliance.replication.bookkeeping import fold_pending, log_tables
from marmot_appliance.replication.sqlite_util import quote_ident
from marmot_appliance.snapshots.local_state import BUSY_TIMEOUT_S, open_readonly, read_positions

log = logging.getLogger(__name__)


def consistent_copy(db_path: Path, dest: Path) -> dict[str, int]:
    """VACUUM the live database INTO `dest`; returns the positions the copy reflects."""
    if not db_path.exists():
        raise DatabaseStateError(f"database {db_path} does not exist")
    try:
        source = open_readonly(db_path)
    except sqlite3.Error as exc:
        raise DatabaseStateError(f"cannot open database {db_path}: {exc}") from exc
    try:
        source.execute("VACUUM main INTO ?", (str(dest),))
    except sqlite3.Error as exc:
        raise DatabaseStateError(f"cannot copy database {db_path} for a snapshot: {exc}") from exc
    finally:
        source.close()
    copy = sqlite3.connect(dest, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        strip_node_private_state(copy)
        return read_positions(copy)
    finally:
        copy.close()


def strip_node_private_state(copy: sqlite3.Connection) -> int:
    """Fold, then empty, the capture log of a *copy*. Returns the log rows removed."""
    copy.execute("PRAGMA synchronous = OFF")  # a scratch file: a crash just means a new copy
    copy.execute("BEGIN IMMEDIATE")
    try:
        if log_tables(copy):
            fold_pending(copy)
        removed = 0
        for name in log_tables(copy):
            removed += max(copy.execute(f"DELETE FROM {quote_ident(name)}").rowcount, 0)
        copy.execute("COMMIT")
    except BaseException:
        copy.execute("ROLLBACK")
        raise
    if removed:
        log.debug("snapshot copy: folded and removed %d unpublished log rows of the saving node", removed)
    return removed
