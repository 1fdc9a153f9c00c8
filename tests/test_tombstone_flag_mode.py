"""Flag mode (the seed's `node -node-id N -nats-url ...`) does not know the other nodes, so it
must not collect tombstones: the horizon argument (docs/capture.md, "Tombstone collection")
needs every node's published-through record, and a horizon computed from this node's record
alone made the applier drop a peer's delayed write as stale, for good.

Real 3-server nats cluster, two real `marmot-appliance node` processes in flag mode, real
SQLite files. Node 2's runtime is paused (SIGSTOP) while its application inserts a row (the
capture trigger logs it; nothing publishes it), node 1 runs its tombstone rounds meanwhile, then
node 2 resumes and publishes. Before the fix node 1 stored a horizon above the row's version and
dropped the row as stale when it came: node 2 kept it, node 1 never had it, health ok on both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3

from tests.replication_cluster import SubprocessNode, execute, table_rows, wait_until

SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY, v)"
# Two collector rounds (every tombstone_interval_s = 30 s by default) and margin.
COLLECTION_WINDOW_S = 100


def _version(db, key: str) -> int:
    conn = sqlite3.connect(db)
    try:
        # Unpublished, the write is still in the change log (its id is its version).
        row = conn.execute('SELECT version FROM "_marmot_ver_kv" WHERE "k0" = ?', (key,)).fetchone()
        return int(row[0]) if row else int(conn.execute('SELECT max(id) FROM "_marmot_log_kv"').fetchone()[0])
    finally:
        conn.close()


async def test_flag_mode_never_drops_a_delayed_peer_write(nats_cluster, wal_db, tmp_path):
    db1, db2 = wal_db("n1.db", SCHEMA), wal_db("n2.db", SCHEMA)
    n1 = SubprocessNode(1, db1, nats_cluster.urls[0], tmp_path / "n1.log").start()
    n2 = SubprocessNode(2, db2, nats_cluster.urls[1], tmp_path / "n2.log").start()
    try:
        await n1.wait_healthy()
        await n2.wait_healthy()
        execute(db1, "INSERT INTO kv VALUES ('gone', 1)")
        execute(db1, "DELETE FROM kv WHERE k = 'gone'")  # a tombstone to collect
        await wait_until(lambda: table_rows(db2, "kv") == [] and n2.health()["status"] == "ok", 30, 0.2,
                         "node 2 to apply the delete")

        # The application holds the write lock before node 2 is paused, so node 2 cannot be frozen
        # in the middle of a write transaction of its own (the insert would wait out its timeout).
        app = sqlite3.connect(db2, timeout=30, isolation_level=None)
        app.execute("BEGIN IMMEDIATE")
        os.kill(n2.process.pid, signal.SIGSTOP)  # its application writes; nothing publishes
        try:
            app.execute("INSERT INTO kv VALUES ('late', 2)")
            app.execute("COMMIT")
            app.close()
            await _while_node_2_is_paused(n1, db2)
        finally:
            os.kill(n2.process.pid, signal.SIGCONT)
        await wait_until(lambda: ("late", 2) in table_rows(db1, "kv"), 60, 0.5, "node 1 to apply node 2's delayed row")
        assert table_rows(db1, "kv") == table_rows(db2, "kv") == [("late", 2)]
    finally:
        n1.terminate()
        n2.terminate()


async def _while_node_2_is_paused(n1: SubprocessNode, db2) -> None:
    """Two of node 1's collector rounds after the write: the first takes a candidate horizon
    above the row's version, the second collects at it (what happened before the fix)."""

    def tombstones() -> dict:
        return (n1.health() or {}).get("tombstones") or {}

    late_version = _version(db2, "late")
    rounds = {tombstones().get("last_round")}
    deadline = asyncio.get_running_loop().time() + COLLECTION_WINDOW_S
    while len(rounds) < 3 and int(tombstones().get("horizon") or 0) <= late_version:
        assert asyncio.get_running_loop().time() < deadline, f"node 1 ran no collector rounds: {tombstones()}"
        await asyncio.sleep(1)
        rounds.add(tombstones().get("last_round"))
    state = tombstones()
    assert int(state.get("horizon") or 0) == 0, f"node 1 collected tombstones in flag mode (it knows no other node): {state}"
    assert state.get("waiting_for"), f"status must say why nothing is collected: {state}"
