"""Which apply errors a shard consumer retries and which it dead-letters (replication/consumer.py).

An error of the database or the machine is retried for as long as it lasts: dead-lettering the
message would lose its rows for nothing. An error of the message itself (constraint, type
mismatch, malformed SQL) is permanent: the message is dead-lettered and replication goes on.
"""

from __future__ import annotations

import sqlite3

from marmot_appliance.errors import DatabaseStateError, TransientError
from marmot_appliance.replication.sqlite_util import is_environment_error

# sqlite3 errors worth retrying: another writer holds the lock, or the disk is momentarily
# unavailable. Anything else (constraint, type mismatch, malformed SQL) is permanent.
TRANSIENT_SQLITE_MARKERS = ("locked", "busy", "disk i/o", "database or disk is full", "unable to open")


class ConsumerStopping(Exception):
    """The node stops while an apply waits for the database: leave without moving the position."""


def is_transient(exc: BaseException) -> bool:
    """True for errors of the database or the machine, not of the message: retry, never
    dead-letter. A lock held past busy_timeout, and environment errors (disk full, I/O error,
    read-only file, corruption: the applier raises DatabaseStateError for those) that last as
    long as they last: dead-lettering would lose the rows for nothing."""
    if isinstance(exc, TransientError):  # e.g. sqlite_util.DatabaseBusyError
        return True
    if is_environment(exc):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(marker in text for marker in TRANSIENT_SQLITE_MARKERS)
    return False


def is_environment(exc: BaseException) -> bool:
    """The database cannot be written at all (as opposed to busy for a moment)."""
    return isinstance(exc, DatabaseStateError) or (isinstance(exc, sqlite3.Error) and is_environment_error(exc))
