"""Types shared by capture, codec, publisher and applier (the runtime's internal contract).

Bookkeeping objects in the user's database all start with BOOKKEEPING_PREFIX; capture never
selects a table whose name starts with it (exact prefix comparison, not LIKE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from marmot_appliance.replication.change_log import PendingRows

BOOKKEEPING_PREFIX = "_marmot_"
# Applied stream positions, written in the same transaction as the rows they applied.
# Schema: (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL). Snapshots carry this table.
POSITIONS_TABLE = "_marmot_positions"
DEAD_LETTER_TABLE = "_marmot_dead_letters"

Operation = Literal["upsert", "delete"]


@dataclass(frozen=True)
class RowChange:
    """One row's new state. A primary-key UPDATE is captured as delete(old) + upsert(new).

    version is the hybrid-logical-clock value taken on the writing node (ms << 16 | counter);
    ties are broken by origin node id. A delete is a versioned tombstone.
    """

    table: str
    op: Operation
    pk: tuple[Any, ...]  # primary-key values, in primary-key column order
    columns: tuple[str, ...]  # every column name (upsert) or the primary-key columns (delete)
    values: tuple[Any, ...]  # values for `columns`, exact SQLite storage classes
    version: int
    origin: int  # node id that made the change


@dataclass(frozen=True)
class ChangeBatch:
    """What one message on a shard stream carries."""

    origin: int
    rows: tuple[RowChange, ...]
    # table -> fingerprint of the origin's column layout (see capture.table_fingerprint)
    fingerprints: dict[str, str] = field(default_factory=dict)
    # table -> primary-key column names at the origin
    primary_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)


# -- the publisher's hand-offs (issue 17, item 3) --------------------------------------------
# What the publisher and the codec need from the objects the node runtime hands them; the
# runtime's concrete classes (db_thread.DbThread, capture.ChangeCapture, wakeup.CommitWakeup,
# node/status.RuntimeStatus) match these by shape, so replication/ imports nothing above it.
_T = TypeVar("_T")


class WorkerThread(Protocol):
    """Runs blocking database calls off the event loop, one at a time (a DbThread)."""

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T: ...


class PublishSource(Protocol):
    """The captured-row log the publisher reads, retires and reports into (a ChangeCapture)."""

    def read_pending_rows(self, limit: int = ..., after_id: int = ...) -> PendingRows: ...
    def mark_rows_published(self, read: PendingRows, acked: Collection[int] | None = ...) -> int: ...
    def record_dead_letter(self, stream: str, reason: str) -> None: ...


class CommitSignal(Protocol):
    """Wakes the publisher when a local commit may have logged rows (a CommitWakeup)."""

    async def wait(self, timeout_s: float | None = None) -> bool: ...


class PublishStatus(Protocol):
    """The part of the node's status the publisher keeps current (a RuntimeStatus)."""

    pending_rows: int
    last_publish: float | None


# -- the shard consumer's hand-offs (issue 17, item 3) ---------------------------------------
# The consumer takes the concrete BatchApplier, DbThread and OwnPublishes (all in replication/);
# only the status lives in node/, so it is matched by shape (node/status.RuntimeStatus fits).


class ConsumerStatus(Protocol):
    """The part of the node's status a shard consumer reports into (/health reads it)."""

    applied: dict[str, int]  # stream -> applied position
    lag: dict[str, int]  # stream -> entries behind
    # stream -> entries dropped by retention before they were applied, while no snapshot closes
    # them: {"missing_from", "missing_to", "missing", "since"}
    gaps: dict[str, dict[str, Any]]
    gap_recovery: dict[str, str]  # stream -> what is being done about the gap (the node's word)
    apply_blocked: dict[str, str]  # stream -> why the database cannot take its rows now
    dead_letters: int
    last_apply: float | None  # unix time of the last applied batch

