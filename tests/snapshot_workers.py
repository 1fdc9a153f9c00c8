"""Subprocesses for snapshot tests: a reader that keeps the database open, and a save+restore
run that reports its own peak memory. Run as `python -m tests.snapshot_workers <command> ...`."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path


def reader(db: str, stop_file: str, out_file: str) -> None:
    """Read in a loop until stop_file exists; record every error that is not SQLITE_BUSY."""
    conn = sqlite3.connect(db, timeout=0.2)
    errors: list[str] = []
    busy = 0
    reads = 0
    counts: set[int] = set()
    deadline = time.monotonic() + 300  # bounded even if the test never writes the stop file
    while not Path(stop_file).exists() and time.monotonic() < deadline:
        try:
            count, _total = conn.execute("SELECT count(*), sum(qty) FROM items").fetchone()
            counts.add(count)
            reads += 1
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                busy += 1
            else:
                errors.append(repr(exc))
        except sqlite3.Error as exc:
            errors.append(repr(exc))
    conn.close()
    Path(out_file).write_text(json.dumps({"errors": errors, "busy": busy, "reads": reads, "counts": sorted(counts)}))


def make_db(path: Path, megabytes: int) -> None:
    from tests.snapshot_support import SCHEMA, fill

    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    conn.close()
    rows_per_mb = 1024 // 1  # ~1 KiB per row
    done = 0
    while done < megabytes * rows_per_mb:
        batch = min(20000, megabytes * rows_per_mb - done)
        fill(path, done, batch, blob_size=900, positions={"marmot-changes-1": 1 + done})
        done += batch


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def save_restore(urls: list[str], workdir: Path) -> dict:
    """Save workdir/source.db (made by `make-db` in another process) and restore it elsewhere."""
    import nats

    from marmot_appliance.snapshots import restore_snapshot, save_snapshot
    from tests.snapshot_support import make_cluster

    source, target = workdir / "source.db", workdir / "target.db"
    conn = sqlite3.connect(target)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    cluster = make_cluster(urls, {"n1": source, "n2": target}, shards=1)
    nc = await nats.connect(servers=urls, connect_timeout=5)
    js = nc.jetstream(timeout=30)
    before = peak_rss_kib()
    try:
        info = await save_snapshot(js, cluster, cluster.node("n1"), source)
        await restore_snapshot(js, cluster, cluster.node("n2"), target)
        after = peak_rss_kib()
        check = sqlite3.connect(target).execute("SELECT count(*) FROM items").fetchone()[0]
        return {"size": info.size, "peak_before_kib": before, "peak_kib": after, "rows": check}
    finally:
        for stream in ("OBJ_" + cluster.snapshot_bucket,):
            try:
                await js.delete_stream(stream)  # frees the 3 replicas' disk right away
            except Exception:
                pass
        await nc.close()


def main(argv: list[str]) -> int:
    command = argv[0]
    if command == "reader":
        reader(*argv[1:4])
        return 0
    if command == "make-db":
        make_db(Path(argv[1]) / "source.db", int(argv[2]))
        return 0
    if command == "save-restore":
        urls = argv[1].split(",")
        result = asyncio.run(save_restore(urls, Path(argv[2])))
        print(json.dumps(result))
        return 0
    print(f"unknown command {command}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
