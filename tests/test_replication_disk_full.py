"""A full disk pauses replication; it never loses rows (issue 10 case 8).

Node 2's database lives on a small tmpfs that a filler file fills up: a real "database or disk
is full" from the kernel, on real node processes and a real nats-server. While it lasts the
messages are retried (never dead-lettered), /health is 503 and names the reason; once the
filler is removed the node catches up by itself. Needs root (mount); skipped otherwise, and
required when MARMOT_REQUIRE_LAB=1.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest

from marmot_appliance.replication.types import DEAD_LETTER_TABLE
from tests.conftest import skip_or_fail
from tests.harness import make_wal_db
from tests.replication_cluster import SubprocessNode, execute, wait_until

SCHEMA = "CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)"
ROWS = 2000


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        skip_or_fail("mounting a small tmpfs needs root")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(directory) -> "os.PathLike":
    """Write a filler file until the file system refuses another byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (256 * 1024, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def count(db, sql: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


async def test_disk_full_is_retried_reported_and_recovered_without_loss(nats_server, tmp_path, small_disk):
    dbs = [make_wal_db(tmp_path / "n1.db", SCHEMA), make_wal_db(small_disk / "n2.db", SCHEMA)]
    nodes = [SubprocessNode(i, db, nats_server.url, tmp_path / f"n{i}.log", shards=1, replicas=1)
             for i, db in zip((1, 2), dbs)]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            await node.wait_healthy()
        filler = fill(small_disk)
        execute(dbs[0], "INSERT INTO blobs VALUES (?, ?)", [(i, os.urandom(1024)) for i in range(ROWS)], many=True)

        def full_reported() -> bool:
            health = nodes[1].health()
            return bool(health) and health["status"] == "unhealthy" and "full" in str(health.get("apply_blocked"))

        await wait_until(full_reported, 120, 0.2, "node 2 unhealthy, naming the full disk")
        assert count(dbs[1], f'SELECT count(*) FROM "{DEAD_LETTER_TABLE}"') == 0

        os.unlink(filler)  # space returns
        await wait_until(lambda: count(dbs[1], "SELECT count(*) FROM blobs") == ROWS, 120, 0.2, "all rows on node 2")
        await wait_until(lambda: (nodes[1].health() or {}).get("status") == "ok", 60, 0.2, "node 2 healthy again")
        assert count(dbs[1], f'SELECT count(*) FROM "{DEAD_LETTER_TABLE}"') == 0
        assert "marmot_apply_blocked" in nodes[1].metrics()
    finally:
        for node in nodes:
            node.terminate()


def test_a_full_database_raises_the_full_error_not_a_savepoint_error(tmp_path):
    """`PRAGMA max_page_count` as a stand-in for a full disk, on the applier's own connection:
    the error that reaches the consumer is the environment error (retried), not "no such
    savepoint" from a ROLLBACK TO after SQLite already rolled the transaction back."""
    from marmot_appliance.errors import DatabaseStateError
    from marmot_appliance.replication.applier import BatchApplier
    from marmot_appliance.replication.consumer_errors import is_environment, is_transient
    from marmot_appliance.replication.types import ChangeBatch, RowChange

    db = make_wal_db(tmp_path / "full.db", SCHEMA)
    with BatchApplier(db, node_id=2) as applier:
        pages = applier._conn.execute("PRAGMA page_count").fetchone()[0]
        applier._conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        rows = tuple(RowChange("blobs", "upsert", (i,), ("id", "data"), (i, os.urandom(2048)), 10 + i, 1) for i in range(200))
        batch = ChangeBatch(origin=1, rows=rows, primary_keys={"blobs": ("id",)})
        with pytest.raises(DatabaseStateError, match="full") as caught:
            applier.apply(batch, "s-1", 1)
        assert is_environment(caught.value) and is_transient(caught.value)
        assert applier.positions().get("s-1", 0) == 0  # nothing moved
        applier._conn.execute("PRAGMA max_page_count = 1073741823")
        applier.apply(batch, "s-1", 1)
        assert count(db, "SELECT count(*) FROM blobs") == 200
        assert applier.positions()["s-1"] == 1
