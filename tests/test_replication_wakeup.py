"""Commit wake-ups: another process's commit wakes the waiter, with inotify and without."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from marmot_appliance.replication.wakeup import CommitWakeup

WAIT_S = 30.0


def _commit_in_other_process(path) -> None:
    code = (
        "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('insert into t(v) values (1)');"
        "c.commit(); c.close()"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


@pytest.mark.parametrize("use_inotify", [True, False])
async def test_commit_in_another_process_wakes(wal_db, use_inotify):
    db = wal_db("w.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, v)")
    # A long fallback interval: only the commit signal can wake us within the wait.
    wakeup = CommitWakeup(db, fallback_interval_s=3600, use_inotify=use_inotify)
    wakeup.start()
    try:
        assert wakeup.mode == ("inotify" if use_inotify else "data_version")
        # Opening the database creates its -wal file: drain that start-up signal (bounded).
        for _ in range(50):
            if not await wakeup.wait(0.2):
                break
        assert await wakeup.wait(0.2) is False  # quiet now: nothing is committing
        waiter = asyncio.create_task(wakeup.wait(WAIT_S))
        await asyncio.sleep(0)
        await asyncio.to_thread(_commit_in_other_process, db)
        assert await waiter is True
    finally:
        await wakeup.close()


async def test_fallback_poll_fires_without_commits(wal_db):
    db = wal_db("f.db", "CREATE TABLE t (id INTEGER PRIMARY KEY)")
    wakeup = CommitWakeup(db, fallback_interval_s=0.05, use_inotify=True)
    wakeup.start()
    try:
        assert await wakeup.wait(WAIT_S) is True
    finally:
        await wakeup.close()


async def test_notify_wakes_immediately(wal_db):
    db = wal_db("n.db")
    wakeup = CommitWakeup(db, fallback_interval_s=3600)
    wakeup.start()
    try:
        wakeup.notify()
        assert await wakeup.wait(WAIT_S) is True
    finally:
        await wakeup.close()
