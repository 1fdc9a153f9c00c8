"""Which shard stream a row's changes travel on.

Every change of one row (table + primary key) must land on the same shard so that one stream
orders them; that needs a hash that is stable across processes, machines and Python versions.
Python's `hash()` is salted per process, so we use BLAKE2b over a canonical, typed encoding of
the primary key. Shards are numbered 1..N, as in Marmot (stream `<prefix>-1` is the first).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from marmot_appliance.replication.canonical import encode_value


def row_key(table: str, pk: tuple[Any, ...]) -> bytes:
    """The canonical bytes identifying one row: table name, then each key value, typed."""
    name = table.encode("utf-8", "surrogatepass")
    parts = [struct.pack(">I", len(name)), name]
    parts.extend(encode_value(value) for value in pk)
    return b"".join(parts)


def shard_for(table: str, pk: tuple[Any, ...], shards: int) -> int:
    """The 1-based shard number (1..shards) of a row."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards == 1:
        return 1  # the common case skips hashing entirely
    digest = hashlib.blake2b(row_key(table, pk), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards + 1


def shard_numbers(shards: int) -> range:
    """Every shard number, in order."""
    return range(1, shards + 1)
