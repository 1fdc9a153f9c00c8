"""Restoring under a live reader, and memory that stays flat whatever the snapshot size."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marmot_appliance.snapshots import restore_snapshot, save_snapshot
from tests.snapshot_support import SCHEMA, connect, fill, make_cluster, user_digests

REPO = Path(__file__).resolve().parent.parent


def _worker(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.snapshot_workers", *args], cwd=REPO, **kwargs)


async def test_reader_in_another_process_sees_only_busy_during_restore(nats_cluster, wal_db, tmp_path):
    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    fill(source, 0, 40000, blob_size=400, positions={"marmot-changes-1": 99})  # ~20 MB
    fill(target, 1_000_000, 1234, blob_size=10)
    cluster = make_cluster(nats_cluster.urls, {"n1": source, "n2": target})
    stop, out = tmp_path / "stop", tmp_path / "reader.json"
    reader = _worker("reader", str(target), str(stop), str(out))
    nc, js = await connect(nats_cluster.urls)
    try:
        await save_snapshot(js, cluster, cluster.node("n1"), source)
        time.sleep(0.3)  # let the reader start reading the old contents
        await restore_snapshot(js, cluster, cluster.node("n2"), target)
        time.sleep(0.3)  # ...and read the new ones
    finally:
        stop.touch()
        reader.wait(timeout=120)
        await nc.close()
    result = json.loads(out.read_text())
    assert result["errors"] == []
    assert result["reads"] > 0
    # Every read saw a whole database: the old one or the restored one, never a mix.
    assert set(result["counts"]) <= {1234, 40000} and 40000 in result["counts"]
    conn = sqlite3.connect(target)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    assert user_digests(target)["items"] == user_digests(source)["items"]


def _save_restore_peak(urls: list[str], workdir: Path, megabytes: int) -> dict:
    workdir.mkdir()
    try:
        # The database is written by another process so its peak memory is not counted here.
        assert _worker("make-db", str(workdir), str(megabytes)).wait(timeout=900) == 0
        proc = _worker("save-restore", ",".join(urls), str(workdir), stdout=subprocess.PIPE, text=True)
        stdout, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, stdout
        return json.loads(stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
def test_memory_stays_flat_from_10_mb_to_500_mb(nats_cluster, tmp_path):
    # 500 MB source + copy + download + target (+ WAL) here, and 3 replicas in JetStream.
    needed = 500 * 1024 * 1024 * 9
    free = shutil.disk_usage(tmp_path).free
    if free < needed:
        pytest.skip(f"needs {needed >> 30} GiB free disk, {free >> 30} GiB available")
    small = _save_restore_peak(nats_cluster.urls, tmp_path / "small", 10)
    large = _save_restore_peak(nats_cluster.urls, tmp_path / "large", 500)
    assert large["size"] > 40 * small["size"]
    assert small["rows"] == 10 * 1024 and large["rows"] == 500 * 1024
    growth_kib = large["peak_kib"] - small["peak_kib"]
    assert growth_kib < 8 * 1024, (small, large)
