"""Snapshot throughput and catch-up time, against the raw object store, in one run.

    .venv/bin/python bench/snapshot.py [--size-mb 200] [--nats-url URLS] [--keep-dir]

Without --nats-url a 3-server JetStream cluster is started on free 127.0.0.1 ports (stopped by
PID at the end). Prints, for one database of --size-mb:
  * save (VACUUM INTO + upload + verify + manifest) MB/s vs raw object-store put of the same file;
  * restore (download + verify + backup API into a live database) MB/s vs raw object-store get;
  * seconds for a new, empty node (a real node runtime) to be fully caught up: restore the
    snapshot, then replay the entries written after it.
Bounded: every wait has a timeout; temp files are removed unless --keep-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nats  # noqa: E402
from nats.js.api import ObjectMeta, ObjectMetaOptions  # noqa: E402

from marmot_appliance.node.config import config_from_flags  # noqa: E402
from marmot_appliance.node.runtime import NodeRuntime  # noqa: E402
from marmot_appliance.snapshots import restore_snapshot, save_snapshot  # noqa: E402
from marmot_appliance.spec.model import SnapshotSettings  # noqa: E402

WAIT_S = 300.0
ROW_BYTES = 1000


def make_database(path: Path, megabytes: int) -> int:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER, payload BLOB)")
    rows = megabytes * 1_000_000 // ROW_BYTES
    batch = 10_000
    for start in range(0, rows, batch):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO items VALUES (?, ?, randomblob(?))",
            ((f"k{i:09d}", i, ROW_BYTES - 40) for i in range(start, min(rows, start + batch))),
        )
        conn.execute("COMMIT")
    conn.close()
    return rows


def mbps(size: int, seconds: float) -> str:
    return f"{size / 1e6 / max(seconds, 1e-9):7.1f} MB/s  ({seconds:6.2f} s)"


async def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        await asyncio.sleep(0.1)


def node_config(node_id: int, db: Path, url: str):
    config = config_from_flags(db_path=str(db), node_id=node_id, nats_url=url, shards=1, log_replicas=3,
                               max_log_entries=500, enable_snapshot=True, poll_interval_ms=100)
    snapshots = SnapshotSettings(enabled=True, every_entries=None)  # saves are explicit in the bench
    return replace(config, cluster=replace(config.cluster, snapshots=snapshots))


async def run(url: str, urls: list[str], work: Path, size_mb: int) -> None:
    source, target, fresh = work / "source.db", work / "target.db", work / "fresh.db"
    print(f"building a {size_mb} MB database ...", flush=True)
    rows = make_database(source, size_mb)
    sqlite3.connect(target).execute("PRAGMA journal_mode=WAL").close()
    nc = await nats.connect(servers=urls)
    js = nc.jetstream(timeout=60)
    stop = asyncio.Event()
    writer = NodeRuntime(node_config(1, source, url))
    writer_task = asyncio.create_task(writer.run(stop))
    try:
        await wait_for(lambda: _true(writer.consumers or writer_task.done()), "node 1 to start")
        cluster, node1 = writer.config.cluster, writer.config.node

        started = time.monotonic()
        info = await save_snapshot(js, cluster, node1, source, force=True)
        save_s = time.monotonic() - started
        size = info.size

        raw = await js.create_object_store("bench-raw", replicas=3)
        copy = work / "raw.db"
        shutil.copyfile(source, copy)
        started = time.monotonic()
        with open(copy, "rb") as handle:
            await raw.put("raw", handle, meta=ObjectMeta(name="raw", options=ObjectMetaOptions(max_chunk_size=256 * 1024)))
        put_s = time.monotonic() - started
        started = time.monotonic()
        with open(work / "raw-get.db", "wb") as handle:
            await raw.get("raw", writeinto=handle)
        get_s = time.monotonic() - started
        await js.delete_object_store("bench-raw")
        for leftover in (copy, work / "raw-get.db"):
            leftover.unlink(missing_ok=True)

        started = time.monotonic()
        await restore_snapshot(js, cluster, replace(node1, id=2, name="node-2", db=str(target)), target)
        restore_s = time.monotonic() - started

        # Entries written after the snapshot: the new node must restore and then replay them.
        for k in range(300):
            conn = sqlite3.connect(source, timeout=30)
            with conn:
                conn.execute("UPDATE items SET n = n + 1 WHERE id = ?", (f"k{k:09d}",))
            conn.close()
            await asyncio.sleep(0.005)  # separate commits travel as separate entries
        stream = cluster.replication.stream_name(1)
        await wait_for(lambda: _published(js, stream, writer), "node 1 to publish")
        last_seq = (await js.stream_info(stream)).state.last_seq

        sqlite3.connect(fresh).execute("PRAGMA journal_mode=WAL").close()
        started = time.monotonic()
        newcomer = NodeRuntime(node_config(3, fresh, url))
        newcomer_task = asyncio.create_task(newcomer.run(stop))
        await wait_for(lambda: _caught_up(fresh, stream, last_seq, newcomer_task), "the new node to catch up")
        catch_up_s = time.monotonic() - started

        print(f"\ndatabase: {size / 1e6:.1f} MB, {rows} rows; 3 JetStream servers, R3 buckets")
        print(f"save (copy + upload + verify + manifest)  {mbps(size, save_s)}")
        print(f"raw object-store put of the same file     {mbps(size, put_s)}")
        print(f"restore (download + verify + backup API)  {mbps(size, restore_s)}")
        print(f"raw object-store get of the same file     {mbps(size, get_s)}")
        print(f"new empty node fully caught up            {catch_up_s:6.2f} s  (snapshot + {last_seq - info.positions.get(stream, 0)} entries)")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*[t for t in (writer_task, locals().get("newcomer_task")) if t],
                                              return_exceptions=True), 60)
        await nc.close()


async def _true(value) -> bool:
    return bool(value)


async def _published(js, stream: str, writer: NodeRuntime) -> bool:
    """Every local change of node 1 was published (its capture log is empty)."""
    conn = sqlite3.connect(writer.config.db_path)
    try:
        return conn.execute("SELECT count(*) FROM _marmot_log_items").fetchone()[0] == 0
    finally:
        conn.close()


async def _caught_up(db: Path, stream: str, last_seq: int, task: asyncio.Task) -> bool:
    if task.done():
        task.result()
        raise SystemExit("bench: the new node stopped")
    try:
        conn = sqlite3.connect(db)
        try:
            row = conn.execute("SELECT seq FROM _marmot_positions WHERE stream = ?", (stream,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    return bool(row) and row[0] >= last_seq


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--nats-url", help="use this JetStream cluster instead of starting one")
    parser.add_argument("--keep-dir", action="store_true", help="keep the temp directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="marmot-bench-snapshot-"))
    needed = args.size_mb * 1_000_000 * 10
    if shutil.disk_usage(work).free < needed:
        print(f"bench: needs about {needed / 1e9:.1f} GB free in {work.parent}", file=sys.stderr)
        return 1
    servers = None
    try:
        if args.nats_url:
            url = args.nats_url
        else:
            from tests.harness import NatsCluster

            (work / "nats").mkdir()
            servers = NatsCluster(root=work / "nats").start(3)
            url = servers.url
        asyncio.run(run(url, url.split(","), work, args.size_mb))
    finally:
        if servers is not None:
            servers.stop()
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
