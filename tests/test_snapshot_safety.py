"""Snapshot safety on a real 3-server JetStream cluster: corruption, concurrent savers, leases,
pending local changes, when a restore is needed."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest

from marmot_appliance.replication.capture import ChangeCapture
from marmot_appliance.snapshots import (
    NoSnapshotError,
    RestoreRefusedError,
    SnapshotBusyError,
    SnapshotSkipped,
    decide_restore,
    open_store,
    restore_snapshot,
    save_snapshot,
)
from marmot_appliance.snapshots.errors import LeaseLostError
from marmot_appliance.snapshots.lease import SnapshotLease
from marmot_appliance.snapshots.store import SnapshotStore, retry_no_responders
from tests.harness import add_stream
from tests.snapshot_support import SCHEMA, connect, fill, make_cluster, positions_of, user_digests


async def _corrupt_one_chunk(js, store: SnapshotStore, name: str) -> None:
    """Replace the object's first chunk with garbage, the way a damaged disk would."""
    info = await store.object_info(name)
    subject = f"$O.{store.bucket}.C.{info.nuid}"
    first = await js.get_msg(store.stream, seq=1, subject=subject, next=True)
    await js.delete_msg(store.stream, first.seq)
    await js.publish(subject, b"\x00garbage" * 100)


async def test_corrupted_snapshot_is_rejected_and_previous_one_used(nats_cluster, wal_db, caplog):
    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    cluster = make_cluster(nats_cluster.urls, {"n1": source, "n2": target})
    nc, js = await connect(nats_cluster.urls)
    try:
        fill(source, 0, 500, positions={"marmot-changes-1": 10})
        older = await save_snapshot(js, cluster, cluster.node("n1"), source)
        digest_older = user_digests(source)["items"]
        fill(source, 500, 500, positions={"marmot-changes-1": 20})
        newer = await save_snapshot(js, cluster, cluster.node("n1"), source)
        store = await open_store(js, cluster, create=False)
        await _corrupt_one_chunk(js, store, newer.name)

        with caplog.at_level(logging.ERROR, logger="marmot_appliance.snapshots"):
            used = await restore_snapshot(js, cluster, cluster.node("n2"), target)
    finally:
        await nc.close()
    assert used.name == older.name
    assert positions_of(target)["marmot-changes-1"] == 10
    assert user_digests(target)["items"] == digest_older
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert newer.name in messages and "failed verification" in messages and "sha256" in messages


async def test_only_corrupted_snapshots_fail_with_clear_error_and_leave_db_untouched(nats_cluster, wal_db):
    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    fill(target, 0, 10)
    before = user_digests(target)
    cluster = make_cluster(nats_cluster.urls, {"n1": source, "n2": target}, keep=1)
    nc, js = await connect(nats_cluster.urls)
    try:
        fill(source, 0, 300, positions={"marmot-changes-1": 3})
        only = await save_snapshot(js, cluster, cluster.node("n1"), source)
        store = await open_store(js, cluster, create=False)
        await _corrupt_one_chunk(js, store, only.name)
        with pytest.raises(NoSnapshotError, match="failed verification"):
            await restore_snapshot(js, cluster, cluster.node("n2"), target)
    finally:
        await nc.close()
    assert user_digests(target) == before


async def test_two_nodes_saving_at_the_same_moment_produce_one_snapshot(nats_cluster, wal_db):
    dbs = {"n1": wal_db("n1.db", SCHEMA), "n2": wal_db("n2.db", SCHEMA)}
    for db in dbs.values():
        fill(db, 0, 20000, blob_size=200, positions={"marmot-changes-1": 40, "marmot-changes-2": 7})
    cluster = make_cluster(nats_cluster.urls, dbs)
    conns = [await connect(nats_cluster.urls) for _ in dbs]
    try:
        # Buckets exist first, so both savers race for the lease rather than for bucket creation.
        await open_store(conns[0][1], cluster)
        results = await asyncio.gather(
            *(save_snapshot(js, cluster, cluster.node(name), db) for (_nc, js), (name, db) in zip(conns, dbs.items())),
            return_exceptions=True,
        )
        saved = [r for r in results if not isinstance(r, BaseException)]
        skipped = [r for r in results if isinstance(r, SnapshotSkipped)]
        assert len(saved) == 1 and len(skipped) == 1, results
        store = await open_store(conns[0][1], cluster, create=False)
        manifest, _rev = await store.read_manifest()
        assert [s.name for s in manifest.snapshots] == [saved[0].name]
        assert await store.object_names() == [saved[0].name]
    finally:
        for nc, _js in conns:
            await nc.close()


async def test_lease_expires_when_holder_stops_renewing_and_fences_it(nats_cluster):
    nc, js = await connect(nats_cluster.urls)
    try:
        store = await SnapshotStore.open(js, "leasetest", replicas=3, lease_ttl_s=2.0)
        dead = SnapshotLease(store.lease_kv, "n1")
        await dead.acquire()  # ...and never renews, as if its process had died
        other = SnapshotLease(store.lease_kv, "n2")
        with pytest.raises(SnapshotBusyError, match="n1"):
            await other.acquire()
        for _ in range(120):  # JetStream ages the value out after the bucket's TTL
            try:
                await other.acquire()
                break
            except SnapshotBusyError:
                await asyncio.sleep(0.5)
        else:
            pytest.fail("lease never expired")
        with pytest.raises(LeaseLostError):
            await dead.renew()
        await other.renew()
    finally:
        await nc.close()


def _pending_write(db, node_id: int) -> ChangeCapture:
    capture = ChangeCapture(db, node_id)
    capture.install()
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO items (id, qty) VALUES ('local-only', 1)")
    conn.commit()
    conn.close()
    assert capture.pending_count() == 1
    return capture


async def test_restore_refuses_to_drop_unpublished_local_changes(nats_cluster, wal_db):
    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    cluster = make_cluster(nats_cluster.urls, {"n1": source, "n2": target})
    fill(source, 0, 100, positions={"marmot-changes-1": 5})
    capture = _pending_write(target, 2)
    nc, js = await connect(nats_cluster.urls)
    try:
        await save_snapshot(js, cluster, cluster.node("n1"), source)
        with pytest.raises(RestoreRefusedError, match="not published"):
            await restore_snapshot(js, cluster, cluster.node("n2"), target)
        conn = sqlite3.connect(target)
        assert conn.execute("SELECT qty FROM items WHERE id = 'local-only'").fetchone() == (1,)
        conn.close()

        # With a flush callback that publishes them (as the runtime's publisher does), it restores.
        published = []

        async def flush() -> None:
            pending = capture.read_pending(100)
            payload = repr([p.change for p in pending]).encode()
            ack = await retry_no_responders(lambda: js.publish("marmot-change-log-1", payload))
            published.append(ack.seq)
            capture.mark_published([p.log_id for p in pending])

        await add_stream(js, name="marmot-changes-1", subjects=["marmot-change-log-1"])
        # (a new stream can take a moment to answer publishes on every server: retried above)
        await restore_snapshot(js, cluster, cluster.node("n2"), target, flush_pending=flush)
        assert published == [1]
    finally:
        capture.close()
        await nc.close()
    assert user_digests(target)["items"] == user_digests(source)["items"]


async def test_restored_database_belongs_to_the_restoring_node(nats_cluster, wal_db):
    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    cluster = make_cluster(nats_cluster.urls, {"n1": source, "n2": target})
    source_capture = _pending_write(source, 1)  # n1 has an unpublished change when it saves
    target_capture = ChangeCapture(target, 2)
    target_capture.install()
    conn = sqlite3.connect(target)
    conn.execute("INSERT INTO sessions VALUES ('t2', 'n2 user')")  # local writes push n2's clock
    conn.commit()
    conn.close()
    target_capture.mark_published([p.log_id for p in target_capture.read_pending(10)])
    target_capture.close()
    fill(source, 0, 50, positions={"marmot-changes-1": 4})
    nc, js = await connect(nats_cluster.urls)
    try:
        await save_snapshot(js, cluster, cluster.node("n1"), source)
        await restore_snapshot(js, cluster, cluster.node("n2"), target)
    finally:
        source_capture.close()
        await nc.close()
    conn = sqlite3.connect(target)
    try:
        assert conn.execute("SELECT value FROM _marmot_meta WHERE key = 'node_id'").fetchone() == (2,)
        logs = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE name LIKE '\\_marmot\\_log\\_%' ESCAPE '\\'")]
        assert logs and all(conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] == 0 for n in logs)
        # n1's unpublished row is in the data (it was committed there) but not queued as ours.
        assert conn.execute("SELECT qty FROM items WHERE id = 'local-only'").fetchone() == (1,)
    finally:
        conn.close()
    src = sqlite3.connect(source)
    assert sqlite3.connect(target).execute("SELECT hlc FROM _marmot_clock").fetchone()[0] >= src.execute(
        "SELECT hlc FROM _marmot_clock"
    ).fetchone()[0]
    src.close()


async def test_decide_restore_follows_stream_bounds_and_positions(nats_cluster, wal_db):
    db = wal_db("n1.db", SCHEMA)
    fresh = wal_db("n9.db", SCHEMA)
    cluster = make_cluster(nats_cluster.urls, {"n1": db, "n9": fresh}, shards=1)
    nc, js = await connect(nats_cluster.urls)
    try:
        await add_stream(js, name="marmot-changes-1", subjects=["marmot-change-log-1"], max_msgs=10)
        for i in range(5):
            await retry_no_responders(lambda: js.publish("marmot-change-log-1", b"x%d" % i))
        decision = await decide_restore(js, cluster, cluster.node("n9"), fresh)
        assert not decision.needed and decision.never_replicated  # the log still starts at 1: replay
        for i in range(25):
            await js.publish("marmot-change-log-1", b"y%d" % i)  # first_seq is now 21
        fill(db, 0, 10, positions={"marmot-changes-1": 12})
        decision = await decide_restore(js, cluster, cluster.node("n1"), db)
        assert decision.needed and decision.required == {"marmot-changes-1": 20}
        with pytest.raises(NoSnapshotError, match="snapshot save"):
            await restore_snapshot(js, cluster, cluster.node("n1"), db, required=decision.required)
        fill(db, 0, 10, positions={"marmot-changes-1": 20})
        assert not (await decide_restore(js, cluster, cluster.node("n1"), db)).needed
        await save_snapshot(js, cluster, cluster.node("n1"), db)
        decision = await decide_restore(js, cluster, cluster.node("n9"), fresh)
        assert decision.needed  # never replicated, a snapshot exists
    finally:
        await nc.close()
