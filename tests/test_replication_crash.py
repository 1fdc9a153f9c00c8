"""kill -9 of real node processes (the CLI) at random points while applications keep writing."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading

import pytest

from tests.replication_cluster import SubprocessNode, table_rows, wait_converged

SCHEMA = "CREATE TABLE events (id TEXT PRIMARY KEY, node INTEGER, n INTEGER, payload BLOB)"
KILL_CYCLES = 4


class Writer(threading.Thread):
    """Commits rows into one database as an application would, recording what committed."""

    def __init__(self, db, node_id: int, stop: threading.Event, seed: int):
        super().__init__(daemon=True)
        self.db, self.node_id, self.stop_event = db, node_id, stop
        self.committed: dict[str, int] = {}
        self.rng = random.Random(seed)

    def run(self) -> None:
        conn = sqlite3.connect(self.db, timeout=30)
        n = 0
        try:
            while not self.stop_event.is_set() and n < 5000:  # bounded
                n += 1
                key = f"{self.node_id}-{n}"
                rows = [(key, self.node_id, n, self.rng.randbytes(16))]
                if self.rng.random() < 0.2:  # sometimes a multi-row transaction
                    rows += [(f"{key}-{j}", self.node_id, n, b"") for j in range(self.rng.randint(2, 20))]
                with conn:
                    conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", rows)
                    if n > 10 and self.rng.random() < 0.3:
                        old = f"{self.node_id}-{self.rng.randint(1, n - 1)}"
                        conn.execute("UPDATE events SET n = n + 1000000 WHERE id = ?", (old,))
                for row in rows:
                    self.committed[row[0]] = row[2]
                self.stop_event.wait(self.rng.uniform(0.001, 0.01))
        finally:
            conn.close()


@pytest.mark.slow
async def test_kill_9_while_writing_then_restart_loses_nothing(nats_cluster, wal_db, tmp_path):
    rng = random.Random(20240607)
    dbs = [wal_db(f"k{i}.db", SCHEMA) for i in (1, 2, 3)]
    nodes = [SubprocessNode(i, db, nats_cluster.url, tmp_path / f"node{i}.log") for i, db in zip((1, 2, 3), dbs)]
    stop = threading.Event()
    writers = [Writer(db, i, stop, seed=i) for i, db in zip((1, 2, 3), dbs)]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            await node.wait_healthy()
        for writer in writers:
            writer.start()
        for _cycle in range(KILL_CYCLES):
            victim = rng.choice(nodes)
            await asyncio.sleep(rng.uniform(0.2, 1.5))  # a random point in the write stream
            victim.kill9()
            await asyncio.sleep(rng.uniform(0.1, 1.0))  # its application keeps writing meanwhile
            victim.start()
            await victim.wait_healthy()
        stop.set()
        for writer in writers:
            writer.join(timeout=60)
        await wait_converged(dbs, timeout_s=180)
        rows = {r[0]: r for r in table_rows(dbs[0], "events")}
        for writer in writers:
            assert writer.committed, "the writer committed nothing"
            missing = [key for key in writer.committed if key not in rows]
            assert not missing, f"{len(missing)} committed rows missing, e.g. {missing[:5]}"
    finally:
        stop.set()
        for node in nodes:
            node.kill9()
    for node in nodes:
        text = node.log_path.read_text()
        assert "Traceback" not in text, text[-3000:]
