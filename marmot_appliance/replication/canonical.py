"""Canonical bytes for SQLite values, keeping storage classes apart (1 != 1.0 != '1' != b'1').

Shared by shard assignment (which must be stable across nodes and versions: changing this
encoding moves rows to other shards) and by the convergence digest.
"""

from __future__ import annotations

import struct
from typing import Any


def encode_value(value: Any) -> bytes:
    if value is None:
        return b"n"
    if isinstance(value, bool):  # bool is an int subclass; SQLite stores it as an integer
        value = int(value)
    if isinstance(value, int):
        text = str(value).encode()
        return b"i" + struct.pack(">I", len(text)) + text
    if isinstance(value, float):
        return b"f" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        return b"t" + struct.pack(">I", len(data)) + data
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return b"b" + struct.pack(">I", len(data)) + data
    raise TypeError(f"unsupported SQLite value type {type(value).__name__}")
