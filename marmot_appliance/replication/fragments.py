"""Staging the fragments of a large row until its last one arrives (docs/wire-format.md).

A row larger than one message travels as consecutive fragment messages of one run. Their
pieces wait here, in the database, and the stream position moves past each staged fragment in
the same transaction: messages of other origins interleaved with the run are applied as they
come, a crash loses nothing (the staged pieces and the position roll back together), and a
receiver's memory holds one row at a time, not a run. The last fragment is not staged: the
pieces are joined, decoded and applied with it, and the position moves then.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from marmot_appliance.replication.codec import MAX_ROW_BODY_BYTES, Fragment
from marmot_appliance.replication.sqlite_util import quote_ident
from marmot_appliance.replication.types import BOOKKEEPING_PREFIX

FRAGMENTS_TABLE = BOOKKEEPING_PREFIX + "fragments"

_CREATE_SQL = (
    f"CREATE TABLE IF NOT EXISTS {quote_ident(FRAGMENTS_TABLE)} ("
    "stream TEXT NOT NULL, origin INTEGER NOT NULL, idx INTEGER NOT NULL, count INTEGER NOT NULL, "
    "seq INTEGER NOT NULL, piece BLOB NOT NULL, PRIMARY KEY (stream, origin, idx))"
)


@dataclass(frozen=True)
class StageOutcome:
    """What a fragment did: staged (nothing else), completed a row (`body`), or was refused."""

    body: bytes | None = None
    refused: str | None = None


def stage(conn: sqlite3.Connection, stream: str, seq: int, fragment: Fragment) -> StageOutcome:
    """Inside the caller's write transaction. The caller writes the position when the outcome
    is neither a body nor a refusal (a refusal is dead-lettered, which moves it)."""
    conn.execute(_CREATE_SQL)
    table = quote_ident(FRAGMENTS_TABLE)
    if fragment.index == 0:
        # A row starts (again: a publisher that re-sends after a failure starts from its first
        # fragment): whatever an earlier, unfinished attempt left is dropped.
        clear(conn, stream, fragment.origin)
    staged = conn.execute(
        f"SELECT count(*), coalesce(sum(length(piece)), 0), min(count), max(count) FROM {table} "
        "WHERE stream = ? AND origin = ?",
        (stream, fragment.origin),
    ).fetchone()
    have, size, low, high = staged
    problem = None
    if have != fragment.index:
        problem = f"fragment {fragment.index + 1} of {fragment.count} from node {fragment.origin} follows {have} staged"
    elif have and not low == high == fragment.count:
        problem = f"fragment {fragment.index + 1} of {fragment.count} from node {fragment.origin} belongs to another row"
    elif size + len(fragment.piece) > MAX_ROW_BODY_BYTES:
        problem = f"fragments from node {fragment.origin} pass {MAX_ROW_BODY_BYTES} bytes"
    if problem is not None:
        clear(conn, stream, fragment.origin)
        return StageOutcome(refused=problem)
    if fragment.index < fragment.count - 1:
        conn.execute(
            f"INSERT INTO {table} (stream, origin, idx, count, seq, piece) VALUES (?, ?, ?, ?, ?, ?)",
            (stream, fragment.origin, fragment.index, fragment.count, seq, fragment.piece),
        )
        return StageOutcome()
    pieces = [row[0] for row in conn.execute(
        f"SELECT piece FROM {table} WHERE stream = ? AND origin = ? ORDER BY idx", (stream, fragment.origin)
    )]
    pieces.append(fragment.piece)
    return StageOutcome(body=b"".join(pieces))


def clear(conn: sqlite3.Connection, stream: str, origin: int) -> None:
    """Drop the staged pieces of `origin` on `stream` (a row applied, or a set abandoned)."""
    conn.execute(_CREATE_SQL)
    conn.execute(f"DELETE FROM {quote_ident(FRAGMENTS_TABLE)} WHERE stream = ? AND origin = ?", (stream, origin))
