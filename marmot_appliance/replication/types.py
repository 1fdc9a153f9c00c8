"""Types shared by capture, codec, publisher and applier (the runtime's internal contract).

Bookkeeping objects in the user's database all start with BOOKKEEPING_PREFIX; capture never
selects a table whose name starts with it (exact prefix comparison, not LIKE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

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


@dataclass(frozen=True)
class StreamPosition:
    stream: str
    seq: int
