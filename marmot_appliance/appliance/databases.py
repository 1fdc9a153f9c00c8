"""Preflight for the nodes' SQLite databases, before any process starts.

A missing database is created empty in WAL mode (with its directory), mode 0600, so the quick
start works from an empty checkout. An existing database is never modified: if it is not in WAL
mode apply stops with the command that fixes it, because switching journal modes under a
running application is the operator's decision.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from marmot_appliance.appliance.errors import ApplianceError
from marmot_appliance.spec.model import Cluster

SQLITE_HEADER = b"SQLite format 3\x00"


def _journal_mode(path: Path) -> str:
    """"wal" or "rollback", read from the file header (bytes 18-19 are 2 in WAL mode).

    Reading the header needs no lock and no -shm file, so it is safe next to running writers
    and works where opening the database read-only would not.
    """
    with open(path, "rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_HEADER):
        raise ApplianceError(f"{path} is not a SQLite database")
    return "wal" if header[18] == 2 and header[19] == 2 else "rollback"


DATABASE_MODE = 0o600  # the rows are the application's data: owner only (SQLite gives -wal/-shm the same)


def create_wal_database(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create the file ourselves with the mode we want: sqlite3 would create it 0644 (umask).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, DATABASE_MODE)
    try:
        os.fchmod(fd, DATABASE_MODE)  # an empty file left behind may have had another mode
    finally:
        os.close(fd)
    conn = sqlite3.connect(path, timeout=10.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def prepare_databases(cluster: Cluster, create: bool = True) -> list[Path]:
    """Check every node's database; create the missing ones. Returns the paths created.
    With `create=False` only the existing ones are checked (nothing is written)."""
    created: list[Path] = []
    problems: list[str] = []
    for node in sorted(cluster.nodes, key=lambda n: n.id):
        path = Path(node.db)
        try:
            if not path.exists() or (path.is_file() and path.stat().st_size == 0):
                if not create:
                    continue
                create_wal_database(path)
                created.append(path)
                continue
            if not path.is_file():
                problems.append(f"node {node.name}: database {path} is not a file")
                continue
            mode = _journal_mode(path)
            if mode != "wal":
                problems.append(
                    f"node {node.name}: database {path} is in {mode} journal mode, replication needs WAL; "
                    f"switch it with: sqlite3 {path} 'PRAGMA journal_mode=WAL'"
                )
        except ApplianceError as exc:
            problems.append(f"node {node.name}: {exc}")
        except (OSError, sqlite3.Error) as exc:
            problems.append(f"node {node.name}: database {path} is not usable: {exc}")
    if problems:
        raise ApplianceError("\n".join(problems))
    return created
