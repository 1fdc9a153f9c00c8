"""WAL checkpoints run on the runtime's own checkpoint connection, never inside a commit.

Real SQLite files and a real `marmot-appliance node` process on a real nats-server.
"""

from __future__ import annotations

import re
import sqlite3

from marmot_appliance.replication.sqlite_util import connect
from marmot_appliance.replication.wal_checkpoint import WalCheckpointer
from tests.replication_cluster import SubprocessNode, wait_until

SCHEMA = "CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"
ROWS = 20_000  # about 2,000 WAL pages of 4 KiB: past the default auto-checkpoint (1,000 pages)


def test_runtime_connections_never_checkpoint_in_their_commits(wal_db):
    db = wal_db("a.db", SCHEMA)
    writer = connect(db)
    checkpointing = connect(db, checkpoints=True)
    try:
        assert writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert checkpointing.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
        writer.execute("BEGIN IMMEDIATE")
        writer.executemany("INSERT INTO items VALUES (?, ?)", ((i, "x" * 200) for i in range(ROWS)))
        writer.execute("COMMIT")
        # Nothing was copied into the database file by the commit: the checkpointer does it.
        state = WalCheckpointer(db)
        try:
            first = state.checkpoint()
            assert first.frames > 1000 and first.checkpointed == first.frames, first
            again = state.checkpoint()
            assert again.checkpointed == again.frames
        finally:
            state.close()
    finally:
        writer.close()
        checkpointing.close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == ROWS
    finally:
        conn.close()


def pending_frames(metrics: str) -> int | None:
    found = re.search(r"^marmot_wal_frames_pending (\S+)$", metrics, re.M)
    return int(float(found.group(1))) if found else None


async def test_a_running_node_checkpoints_what_an_application_leaves_in_the_wal(nats_server, wal_db, tmp_path):
    """An application that does not checkpoint (wal_autocheckpoint = 0, as docs/replication.md
    suggests on SQLite < 3.51.3) writes past the default threshold; the node's checkpointer copies
    the WAL into the file and says so on /metrics. Before: no checkpoint at all until the last
    connection closed, and no metric."""
    db = wal_db("n1.db", SCHEMA)
    node = SubprocessNode(1, db, nats_server.url, tmp_path / "n1.log", shards=1, replicas=1).start()
    app = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        await node.wait_healthy(90)
        app.execute("PRAGMA wal_autocheckpoint = 0")
        for start in range(0, ROWS, 1000):
            app.execute("BEGIN IMMEDIATE")
            app.executemany("INSERT INTO items VALUES (?, ?)", ((i, "y" * 200) for i in range(start, start + 1000)))
            app.execute("COMMIT")

        def checkpointed_everything() -> bool:
            # The rows reached the database file itself (only a checkpoint writes it, and the
            # application never checkpoints), and the node reports nothing left in the WAL.
            return db.stat().st_size >= ROWS * 200 and pending_frames(node.metrics()) == 0

        await wait_until(checkpointed_everything, 90, 0.5, "the node to checkpoint the application's WAL")
        metrics = node.metrics()
        assert "# TYPE marmot_wal_frames_pending gauge" in metrics
        assert 'marmot_errors_total{kind="checkpoint"}' not in metrics, metrics
    finally:
        app.close()
        assert node.terminate() == 0, node.log_path.read_text()
