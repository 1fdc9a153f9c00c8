"""End to end: rows written, updated and deleted on two real node runtimes appear in `watch`."""

from __future__ import annotations

import asyncio
import math
import signal
import sqlite3
import struct

import nats
import pytest

from marmot_appliance.feed import json_value
from tests.harness import settled
from tests.replication_cluster import SubprocessNode, execute, wait_converged
from tests.test_watch import WatchProcess

SCHEMA = "CREATE TABLE kinds (id INTEGER PRIMARY KEY, i INTEGER, r REAL, x, t TEXT, b BLOB, n)"
BIG_TEXT = "1 MB of text, NUL \x00 and \U0001f600: " + "z" * 1_000_000


def row_as_json(db, key: int) -> dict:
    """The row as SQLite on the writing node returns it, in watch's JSON value form."""
    conn = sqlite3.connect(db)
    try:
        cursor = conn.execute("SELECT * FROM kinds WHERE id = ?", (key,))
        columns = [d[0] for d in cursor.description]
        row = cursor.fetchone()
    finally:
        conn.close()
    return {column: json_value(value) for column, value in zip(columns, row)}


def same_json_values(got: dict, want: dict) -> bool:
    """Equal, telling -0.0 from 0.0 (JSON keeps the sign; == would not)."""
    if got.keys() != want.keys():
        return False
    for column, value in want.items():
        other = got[column]
        if isinstance(value, float):
            if not isinstance(other, float) or struct.pack(">d", other) != struct.pack(">d", value):
                return False
        elif other != value or type(other) is not type(value):
            return False
    return True


@pytest.mark.slow
async def test_changes_on_two_nodes_appear_in_watch_in_stream_order(nats_cluster, wal_db, tmp_path):
    dbs = [wal_db("n1.db", SCHEMA), wal_db("n2.db", SCHEMA)]
    nodes = [
        SubprocessNode(i + 1, db, nats_cluster.url, tmp_path / f"n{i + 1}.log", shards=1, replicas=3)
        for i, db in enumerate(dbs)
    ]
    live = replay = None
    nc = await nats.connect(nats_cluster.urls, connect_timeout=10)
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            await node.wait_healthy()
        js = nc.jetstream(timeout=30)
        # A node reports healthy before its shard consumer has subscribed (it first checks the
        # stream instance): wait for both, or the watch's consumer is mistaken for a node's and
        # the rows are written before the watch listens.
        for _ in range(600):
            if (await settled(lambda: js.stream_info("marmot-changes-1"))).state.consumer_count >= len(nodes):
                break
            await asyncio.sleep(0.1)
        baseline = (await settled(lambda: js.stream_info("marmot-changes-1"))).state.consumer_count
        live = WatchProcess("--nats-url", nats_cluster.url, "--table", "kinds")  # from now
        for _ in range(600):
            if (await settled(lambda: js.stream_info("marmot-changes-1"))).state.consumer_count > baseline:
                break
            await asyncio.sleep(0.1)

        n1, n2 = dbs
        execute(
            n1,
            "INSERT INTO kinds VALUES (1, ?, 0.1, -0.0, ?, x'00ff00', NULL)",
            (-(2**63), BIG_TEXT),
        )
        await wait_converged(dbs)
        execute(n2, "UPDATE kinds SET i = 9223372036854775807, t = 'updated on n2' WHERE id = 1")
        execute(n2, "INSERT INTO kinds (id, i, r, t) VALUES (2, 2, 1e308, 'second')")
        await wait_converged(dbs)
        execute(n1, "DELETE FROM kinds WHERE id = 2")
        await wait_converged(dbs)
        execute(n1, "UPDATE kinds SET id = 3 WHERE id = 1")  # a key change: delete 1, upsert 3
        await wait_converged(dbs)

        lines = live.records(6)
        assert live.stop(signal.SIGINT) == 0
        assert "Traceback" not in live.stderr

        assert [(r["origin"], r["op"], r["pk"]) for r in lines] == [
            (1, "upsert", [1]),
            (2, "upsert", [1]),
            (2, "upsert", [2]),
            (1, "delete", [2]),
            (1, "delete", [1]),
            (1, "upsert", [3]),
        ]
        seqs = [r["seq"] for r in lines]
        assert seqs == sorted(seqs) and all(r["stream"] == "marmot-changes-1" for r in lines)
        versions = [r["version"] for r in lines]
        assert versions == sorted(versions) and len(set(versions)) == 6  # each change outranks the last

        first = lines[0]["values"]
        assert first["t"] == BIG_TEXT and first["i"] == -(2**63) and first["r"] == 0.1
        assert first["b"] == {"$base64": "AP8A"} and first["n"] is None
        assert math.copysign(1, first["x"]) == -1  # -0.0 in an untyped column keeps its sign
        assert lines[1]["values"]["i"] == 2**63 - 1 and lines[1]["values"]["t"] == "updated on n2"
        assert lines[2]["values"]["r"] == 1e308
        assert lines[3]["values"] == {"id": 2} and lines[4]["values"] == {"id": 1}
        # The final state on both nodes is what the last upsert carried, value for value.
        for db in dbs:
            assert same_json_values(lines[5]["values"], row_as_json(db, 3))

        replay = WatchProcess("--nats-url", nats_cluster.url, "--from", "start", "--table", "kinds")
        replayed = replay.records(6)
        assert replay.stop() == 0
        assert replayed == lines  # history replays identically, time stamps included
    finally:
        for watch in (live, replay):
            if watch is not None and watch.proc.poll() is None:
                watch.stop()
        for node in nodes:
            if node.process is not None:
                node.terminate()
        await nc.close()
    for node in nodes:
        assert "Traceback" not in node.log_path.read_text()
