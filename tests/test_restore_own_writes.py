"""A local write committed while a restore is under way is published and comes back on replay.

Found by tests/test_restore_live.py when a *writing* node had to restore: the backup was
abandoned because the application committed rows after the copy was prepared, the retry
published them, and the restored file's own-origin horizon (set when the copy was prepared) was
older than those rows; replay then skipped them as "already in this file" and the node lost its
own 3 rows for good. Real 3-server JetStream cluster, real SQLite files and capture triggers; the
application's write is placed exactly between preparing the copy and the backup (the window the
live test hit by chance) by running it just before the real backup call.
"""

from __future__ import annotations

import sqlite3

from marmot_appliance.replication.applier import BatchApplier
from marmot_appliance.replication.capture import ChangeCapture
from marmot_appliance.replication.types import ChangeBatch
from marmot_appliance.snapshots import restore as restore_module
from marmot_appliance.snapshots import restore_snapshot, save_snapshot
from tests.snapshot_support import SCHEMA, connect, fill, make_cluster

S1 = "marmot-changes-1"


def write(db, key: str) -> None:
    conn = sqlite3.connect(db, timeout=30)
    with conn:
        conn.execute("INSERT INTO items (id, qty) VALUES (?, 1)", (key,))
    conn.close()


def keys(db) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {k for (k,) in conn.execute("SELECT id FROM items")}
    finally:
        conn.close()


async def test_a_write_published_during_the_restore_is_applied_on_replay(nats_cluster, wal_db, monkeypatch):
    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    cluster = make_cluster(nats_cluster.urls, {"n1": source, "n2": target}, shards=1)
    with ChangeCapture(source, 1) as source_capture:  # a real node's file: clock and meta included
        source_capture.install()
    fill(source, 0, 20, positions={S1: 3})
    capture = ChangeCapture(target, 2)
    capture.install()
    write(target, "before-restore")
    published: list[ChangeBatch] = []

    def flush() -> None:  # what the runtime's publisher does: publish, then mark published
        pending = capture.read_pending(100)
        published.append(ChangeBatch(origin=2, rows=tuple(p.change for p in pending)))
        capture.mark_published([p.log_id for p in pending])

    real_backup = restore_module.backup_into_live
    calls = []

    def application_writes_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            write(target, "during-restore")  # after the copy was prepared, before the backup
        return real_backup(*args, **kwargs)

    monkeypatch.setattr(restore_module, "backup_into_live", application_writes_first)
    nc, js = await connect(nats_cluster.urls)
    try:
        await save_snapshot(js, cluster, cluster.node("n1"), source)
        await restore_snapshot(js, cluster, cluster.node("n2"), target, flush_pending=flush)
    finally:
        capture.close()
        await nc.close()
    assert len(calls) == 2  # the first backup was abandoned: a change was pending
    assert [[r.pk[0] for r in b.rows] for b in published] == [["before-restore"], ["during-restore"]]

    # Replay: this node's own published batches come back from the stream after position 3.
    with BatchApplier(target, 2) as applier:
        for seq, batch in enumerate(published, start=4):
            applier.apply(batch, S1, seq)
    assert {"before-restore", "during-restore"} <= keys(target)
