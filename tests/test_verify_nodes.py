"""`marmot-appliance verify` on real node processes (issue 12, section 1).

A divergence injected by writing one replica's file with capture bypassed is found and named by
key; a cluster whose nodes are merely behind (writes flowing, one node paused) is never called
diverged.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import threading

from tests.replication_cluster import SubprocessNode, execute, table_rows, wait_converged
from tests.verify_support import findings, run_cli, verify, write_bypassing_capture

SCHEMA = "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT); CREATE TABLE u (a TEXT, b INTEGER, w, PRIMARY KEY (a, b));"


async def _cluster(nats_server, wal_db, tmp_path, shards: int = 2) -> tuple[list, list[SubprocessNode]]:
    dbs = [wal_db(f"n{i}.db", SCHEMA) for i in (1, 2, 3)]
    nodes = [SubprocessNode(i, db, nats_server.url, tmp_path / f"n{i}.log", shards=shards, replicas=1).start()
             for i, db in zip((1, 2, 3), dbs)]
    for node in nodes:
        await node.wait_healthy()
    return dbs, nodes


async def test_verify_finds_a_bypassed_write_by_key(nats_server, wal_db, tmp_path):
    dbs, nodes = await _cluster(nats_server, wal_db, tmp_path)
    try:
        execute(dbs[0], "INSERT INTO t VALUES (?, ?)", [(k, f"v{k}") for k in range(200)], many=True)
        execute(dbs[1], "INSERT INTO u VALUES (?, ?, ?)", [("a", b, b * 1.5) for b in range(50)], many=True)
        await wait_converged(dbs)
        code, report, stderr = await verify(nats_server.url)
        assert code == 0, (report, stderr)
        assert report["result"] == "converged"
        assert {t["table"]: t["status"] for t in report["tables"]} == {"t": "converged", "u": "converged"}

        write_bypassing_capture(dbs[1], "UPDATE t SET v = 'edited by hand' WHERE k = 7")
        write_bypassing_capture(dbs[2], "DELETE FROM u WHERE a = 'a' AND b = 3")
        write_bypassing_capture(dbs[0], "INSERT INTO t VALUES (1000, 'only on n1')")
        # Node 3 "never received" key 42: row and version gone, as after a lost message.
        write_bypassing_capture(dbs[2], "DELETE FROM t WHERE k = 42")
        write_bypassing_capture(dbs[2], 'DELETE FROM "_marmot_ver_t" WHERE k0 = 42')
        code, report, stderr = await verify(nats_server.url)
        assert code == 1, (report, stderr)
        assert report["result"] == "diverged"
        in_t = findings(report, "t")
        assert set(in_t) == {"[7]", "[42]", "[1000]"}
        assert in_t["[42]"]["reason"] == "missed a version it has applied past"
        assert in_t["[42]"]["newest_nodes"] == ["node-1", "node-2"]
        assert in_t["[42]"]["nodes"]["node-3"] == {"version": 0, "origin": 0, "deleted": False, "present": False,
                                                   "row_hash": None}
        assert in_t["[7]"]["reason"] == "same version, different rows"
        assert in_t["[7]"]["newest_nodes"] == ["node-1", "node-2", "node-3"]
        assert in_t["[7]"]["nodes"]["node-1"]["row_hash"] == in_t["[7]"]["nodes"]["node-3"]["row_hash"]
        assert in_t["[7]"]["nodes"]["node-2"]["row_hash"] != in_t["[7]"]["nodes"]["node-1"]["row_hash"]
        assert in_t["[1000]"]["nodes"]["node-1"]["present"] and not in_t["[1000]"]["nodes"]["node-2"]["present"]
        in_u = findings(report, "u")
        assert set(in_u) == {"['a', 3]"}
        assert not in_u["['a', 3]"]["nodes"]["node-3"]["present"]

        code, report, _ = await verify(nats_server.url, "--table", "u", "--output", "text")
        assert code == 1
        assert "u: diverged, 1 key(s) differ" in report and "key ('a', 3)" in report
    finally:
        for node in nodes:
            node.terminate()


async def test_no_false_alarm_while_writes_flow_and_a_node_lags(nats_server, wal_db, tmp_path):
    """Writers on two nodes insert and update all along; node 3 is paused (SIGSTOP) for a while.

    verify must say converged or "could not decide" (exit 2), never diverged. Repeated 3 times.
    """
    dbs, nodes = await _cluster(nats_server, wal_db, tmp_path)
    stop = threading.Event()

    def writer(db, base: int) -> None:
        rng = random.Random(base)
        conn = sqlite3.connect(db, timeout=30)
        n = 0
        while not stop.is_set():
            with conn:
                conn.execute("INSERT INTO t VALUES (?, ?)", (base + n, "new"))
                conn.execute("UPDATE t SET v = ? WHERE k = ?", (f"upd {n}", rng.randrange(base, base + n + 1)))
            n += 1
            stop.wait(0.005)
        conn.close()

    threads = [threading.Thread(target=writer, args=(dbs[i], (i + 1) * 1_000_000)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    try:
        codes = []
        for _round in range(3):
            os.kill(nodes[2].process.pid, signal.SIGSTOP)
            resume = asyncio.get_running_loop().call_later(3.0, os.kill, nodes[2].process.pid, signal.SIGCONT)
            try:
                # Discovery waits past the pause: an unanswered hello would be "unreachable" (exit 2).
                code, report, stderr = await verify(nats_server.url, "--timeout", "60", "--discover-s", "20")
            finally:
                resume.cancel()
                os.kill(nodes[2].process.pid, signal.SIGCONT)
            assert code != 1, (report, stderr)
            codes.append(code)
        assert 0 in codes, codes  # once caught up, the keys that differed were settled
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for node in nodes:
            node.terminate()


async def test_repair_settles_bypassed_writes_then_verify_says_converged(nats_server, wal_db, tmp_path):
    """Hand edits, a lost row (row and version gone), a row written around capture, and a row
    deleted around capture on the node that wrote it: repair settles each from the right copy,
    and a second repair finds nothing to do."""
    dbs, nodes = await _cluster(nats_server, wal_db, tmp_path)
    try:
        execute(dbs[0], "INSERT INTO t VALUES (?, ?)", [(k, f"v{k}") for k in range(300)], many=True)
        execute(dbs[1], "INSERT INTO u VALUES (?, ?, ?)", [("a", b, b * 1.5) for b in range(50)], many=True)
        await wait_converged(dbs)
        execute(dbs[2], "DELETE FROM t WHERE k = 99")  # a versioned tombstone everywhere
        await wait_converged(dbs)
        expected_t = table_rows(dbs[0], "t")

        write_bypassing_capture(dbs[1], "UPDATE t SET v = 'edited by hand' WHERE k = 7")
        write_bypassing_capture(dbs[0], "UPDATE t SET v = 'edited on its writer' WHERE k = 8")
        write_bypassing_capture(dbs[2], "DELETE FROM t WHERE k = 42")
        write_bypassing_capture(dbs[2], 'DELETE FROM "_marmot_ver_t" WHERE k0 = 42')
        write_bypassing_capture(dbs[1], "INSERT INTO t VALUES (99, 'resurrected around capture')")
        write_bypassing_capture(dbs[0], "DELETE FROM u WHERE a = 'a' AND b = 3")  # n2 wrote u
        write_bypassing_capture(dbs[0], "INSERT INTO t VALUES (5000, 'only on n1, never versioned')")
        code, report, _ = await verify(nats_server.url)
        assert code == 1
        assert set(findings(report, "t")) == {"[7]", "[8]", "[42]", "[99]", "[5000]"}

        # Node 3 collected its tombstones up to now (docs/capture.md): its applier drops rows at or
        # below that version as stale, so key 42 can only reach it as a new write of the image.
        execute(dbs[2], "INSERT INTO _marmot_meta (key, value) VALUES ('tombstones_collected_through', "
                        "(SELECT hlc FROM _marmot_clock)) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        code, out, stderr = await run_cli("repair", "--nats-url", nats_server.url, "--expect-nodes", "3",
                                          "--output", "json")
        assert code == 0, (json.dumps(out["after"]["tables"]) if isinstance(out, dict) else out, stderr)
        repaired = {r["table"]: r for r in out["repaired"]}
        assert repaired["t"]["diverged"] == 5 and repaired["t"]["published"] == 5
        assert repaired["u"]["published"] == 1
        assert out["after"]["result"] == "converged"

        code, report, _ = await verify(nats_server.url)
        assert code == 0, report
        await wait_converged(dbs)
        assert table_rows(dbs[2], "t") == sorted([*expected_t, (5000, "only on n1, never versioned")], key=repr)
        assert (99, "resurrected around capture") not in table_rows(dbs[1], "t")

        code, out, _ = await run_cli("repair", "--nats-url", nats_server.url, "--expect-nodes", "3", "--output", "json")
        assert code == 0 and out["repaired"] == []
    finally:
        for node in nodes:
            node.terminate()


async def test_a_node_that_does_not_answer_means_could_not_decide(nats_server, wal_db, tmp_path):
    """A paused node (SIGSTOP) answers nothing: exit 2 within about --timeout, never 0 or 1."""
    dbs, nodes = await _cluster(nats_server, wal_db, tmp_path)
    try:
        execute(dbs[0], "INSERT INTO t VALUES (?, ?)", [(k, f"v{k}") for k in range(20)], many=True)
        await wait_converged(dbs)
        os.kill(nodes[2].process.pid, signal.SIGSTOP)
        try:
            code, report, stderr = await verify(nats_server.url, "--timeout", "5", "--discover-s", "3")
        finally:
            os.kill(nodes[2].process.pid, signal.SIGCONT)
        assert code == 2, (report, stderr)
        assert report["result"] == "undecided" and report["unreachable"] == ["1 of 3 expected node(s)"]
        code, report, _ = await verify(nats_server.url)
        assert code == 0, report
    finally:
        for node in nodes:
            node.terminate()


async def test_a_node_holding_rows_of_the_table_back_is_catching_up_not_diverged(nats_server, wal_db, tmp_path):
    """A node that misses a version while it holds rows of that table back (held for clock skew,
    as when its clock runs behind) may still apply them: exit 2 naming it, not a divergence."""
    dbs, nodes = await _cluster(nats_server, wal_db, tmp_path)
    try:
        execute(dbs[0], "INSERT INTO t VALUES (?, ?)", [(k, f"v{k}") for k in range(20)], many=True)
        await wait_converged(dbs)
        write_bypassing_capture(dbs[2], "DELETE FROM t WHERE k = 4")
        write_bypassing_capture(dbs[2], 'DELETE FROM "_marmot_ver_t" WHERE k0 = 4')
        code, report, _ = await verify(nats_server.url, "--timeout", "20")
        assert code == 1 and set(findings(report, "t")) == {"[4]"}
        # Node 3 now holds a row of t back until a far-off due time (what a clock skew hold looks like).
        write_bypassing_capture(
            dbs[2], 'INSERT INTO "_marmot_held" (tbl, reason, change, stream, seq, held_at, due_at, origin, version) '
            "VALUES ('t', 'clock skew', x'00', 'marmot-changes-1', 1, 0, 1e12, 1, 1)")
        code, report, stderr = await verify(nats_server.url, "--timeout", "20")
        assert code == 2, (report, stderr)
        (table,) = [t for t in report["tables"] if t["table"] == "t"]
        assert table["status"] == "catching_up" and "node-3 hold rows of this table back" in table["detail"]
    finally:
        for node in nodes:
            node.terminate()
