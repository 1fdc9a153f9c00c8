"""A snapshot saved from a database that had no capture yet (e.g. an application's file copied
in before any node ran on it) restores with capture in place (issue 13).

Before, the restore installed this node's capture only when the snapshot carried capture
tables: the restored file had no triggers until the node's next start, so an application write
in between (the documented sequence is `snapshot restore` with the node stopped, then start it)
was never logged, never published — silently missing on every other node. Real SQLite files,
the real restore path (prepare_copy_for_node + the online backup API).
"""

from __future__ import annotations

import sqlite3

from marmot_appliance.snapshots.dbrestore import backup_into_live, prepare_copy_for_node
from marmot_appliance.spec.model import TableSelection

SCHEMA = "CREATE TABLE t (k TEXT PRIMARY KEY, v);"


def test_a_snapshot_without_capture_restores_with_this_nodes_capture(wal_db, tmp_path):
    snapshot = wal_db("plain-snapshot.db", SCHEMA)  # an application file no node ever ran on
    conn = sqlite3.connect(snapshot)
    conn.execute("INSERT INTO t VALUES ('seed', 1)")
    conn.commit()
    conn.close()
    live = wal_db("live.db", SCHEMA)

    prepare_copy_for_node(snapshot, live, 2, ["marmot-changes-1"], TableSelection())
    backup_into_live(snapshot, live, lambda: 0)

    conn = sqlite3.connect(live)
    try:
        conn.execute("INSERT INTO t VALUES ('written before the node starts', 2)")
        conn.commit()
        logged = conn.execute('SELECT count(*) FROM "_marmot_log_t"').fetchone()[0]
        node_id = conn.execute("SELECT value FROM _marmot_meta WHERE key = 'node_id'").fetchone()
    finally:
        conn.close()
    assert logged == 1, "the application's write after the restore was not captured"
    assert node_id is not None and int(node_id[0]) == 2
