"""A rolling `ALTER TABLE ... ADD COLUMN` ends with the same row on every node (issue 10 case 6).

Node R migrates first and writes `x = 5`; node S, not migrated yet, parks that row (it lacks the
column) and later writes the same row without `x`; then S migrates. An upsert is a full row
image: the newest write wins as a whole, and columns it does not carry take their default. So
both nodes end with S's row and `x` at its default (R used to keep `x = 5`, S had NULL).
"""

from __future__ import annotations

import asyncio
import sqlite3

from tests.replication_cluster import SubprocessNode, execute, table_rows, wait_until

SCHEMA = "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT);"


def _parked(db) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM _marmot_parked").fetchone()[0]
    finally:
        conn.close()


async def test_rolling_add_column_converges_on_the_newest_full_row(nats_server, wal_db, tmp_path):
    r_db, s_db = wal_db("r.db", SCHEMA), wal_db("s.db", SCHEMA)
    nodes = [SubprocessNode(i, db, nats_server.url, tmp_path / f"n{i}.log", shards=1, replicas=1).start()
             for i, db in ((1, r_db), (2, s_db))]
    try:
        for node in nodes:
            await node.wait_healthy()
        execute(r_db, "ALTER TABLE t ADD COLUMN x INTEGER DEFAULT 7")
        execute(r_db, "INSERT INTO t (k, v, x) VALUES ('row', 'from R', 5)")
        await wait_until(lambda: _parked(s_db) == 1, what="S to park R's row (it lacks column x)")
        execute(s_db, "INSERT INTO t (k, v) VALUES ('row', 'from S, later') ON CONFLICT (k) DO UPDATE SET v = excluded.v")
        await wait_until(lambda: table_rows(r_db, "t")[0][1] == "from S, later", what="S's newer row on R")
        # Migrations come minutes after the last write, not within the 0.5 s schema-check tick
        # (a write inside that tick is re-logged with every column on migration, and then the
        # nodes agree by accident). A pause, not a timing assertion: a slow machine only makes
        # the check weaker, never fail spuriously.
        await asyncio.sleep(3)
        execute(s_db, "ALTER TABLE t ADD COLUMN x INTEGER DEFAULT 7")
        await wait_until(lambda: _parked(s_db) == 0, what="S to retry the parked row after migrating")
        assert table_rows(s_db, "t") == [("row", "from S, later", 7)]
        assert table_rows(r_db, "t") == table_rows(s_db, "t")
    finally:
        for node in nodes:
            node.terminate()
