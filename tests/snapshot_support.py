"""Helpers for the snapshot tests: a spec model pointing at the test NATS cluster, real databases."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import nats

from marmot_appliance.replication.sqlite_util import quote_ident
from marmot_appliance.replication.types import BOOKKEEPING_PREFIX, POSITIONS_TABLE
from marmot_appliance.spec.model import (
    Cluster,
    NatsAuth,
    NatsSettings,
    Node,
    ReplicationSettings,
    SnapshotSettings,
)

SCHEMA = """
CREATE TABLE items (id TEXT PRIMARY KEY, qty INTEGER, price REAL, note TEXT, blob BLOB);
CREATE TABLE sessions (token TEXT PRIMARY KEY, user TEXT);
"""


def make_cluster(urls: list[str], dbs: dict[str, Path], shards: int = 2, keep: int = 2, **snapshot_kw) -> Cluster:
    nodes = tuple(
        Node(name=name, id=i + 1, host="127.0.0.1", advertise="127.0.0.1", db=str(path))
        for i, (name, path) in enumerate(dbs.items())
    )
    return Cluster(
        name="snaptest",
        nodes=nodes,
        nats=NatsSettings(embedded=False, urls=tuple(urls), auth=NatsAuth(mode="none")),
        replication=ReplicationSettings(shards=shards, log_replicas=3, max_log_entries=50),
        snapshots=SnapshotSettings(keep=keep, **snapshot_kw),
    )


async def connect(urls: list[str]):
    nc = await nats.connect(servers=urls, connect_timeout=5)
    return nc, nc.jetstream(timeout=30)


def fill(db: Path, start: int, count: int, blob_size: int = 64, positions: dict[str, int] | None = None) -> None:
    """Write rows (exact storage classes) and, like the applier would, positions in one transaction."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {quote_ident(POSITIONS_TABLE)} (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL)"
        )
        conn.executemany(
            "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?)",
            [
                (f"k{i:08d}", i, i / 7, f"note {i}", bytes((i + j) % 256 for j in range(blob_size)))
                for i in range(start, start + count)
            ],
        )
        for stream, seq in (positions or {}).items():
            conn.execute(
                f"INSERT INTO {quote_ident(POSITIONS_TABLE)} (stream, seq) VALUES (?, ?) "
                "ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq",
                (stream, seq),
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def table_digest(db: Path, table: str) -> str:
    """Order-independent digest of a table's rows, storage classes included."""
    conn = sqlite3.connect(db)
    try:
        acc = 0
        count = 0
        for row in conn.execute(f"SELECT * FROM {quote_ident(table)}"):
            h = hashlib.sha256(repr([(type(v).__name__, v) for v in row]).encode()).digest()
            acc ^= int.from_bytes(h, "big")
            count += 1
        return f"{count}:{acc:064x}"
    finally:
        conn.close()


def user_digests(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(db)
    try:
        names = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")
            if not r[0].startswith(BOOKKEEPING_PREFIX) and not r[0].startswith("sqlite_")
        ]
    finally:
        conn.close()
    return {name: table_digest(db, name) for name in sorted(names)}


def positions_of(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute(f"SELECT stream, seq FROM {quote_ident(POSITIONS_TABLE)}").fetchall())
    finally:
        conn.close()
