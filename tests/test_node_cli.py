"""`marmot-appliance node` as users run it: the real CLI in a subprocess."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from tests.harness import free_ports
from tests.replication_cluster import (
    InProcessNode,
    SubprocessNode,
    execute,
    external_nats_spec,
    table_rows,
    wait_converged,
    wait_until,
)

CLI = [sys.executable, "-m", "marmot_appliance"]
REPLICATION = "{shards: 2, log_replicas: 3}"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_database_not_in_wal_mode_is_refused(tmp_path):
    db = tmp_path / "rollback.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY)")
    conn.commit()
    conn.close()
    result = run_cli("node", "-db-path", str(db), "-node-id", "1", "-nats-url", "nats://127.0.0.1:1")
    assert_clean_error(result, "WAL", "journal_mode=delete")
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # untouched
    conn.close()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-db-path", "/nonexistent/dir/x.db", "-node-id", "1"], "does not exist"),
        (["-node-id", "abc"], "expected an integer"),
        (["-node-id", "0", "-db-path", "DB"], "--node-id must be a positive integer"),
        (["-node-id", "1", "-db-path", "DB", "-shards", "0"], "--shards must be >= 1"),
        (["-node-id", "1", "-db-path", "DB", "-nats-url", "127.0.0.1:4222"], "is not a URL"),
        (["-node-id", "1", "-db-path", "DB", "-stream-prefix", "a.b"], "--stream-prefix"),
        (["-db-path", "DB"], "--node-id"),
        (["--spec", "SPEC"], "--spec and --node go together"),
        (["--spec", "SPEC", "--node", "nope"], "node 'nope' is not in the spec"),
        (["--spec", "SPEC", "--node", "n1", "-shards", "3"], "set these in the spec"),
        (["-enable-snapshot=maybe", "-node-id", "1"], "expected true or false"),
    ],
)
def test_bad_input_is_a_message_and_exit_1(tmp_path, wal_db, args, fragment):
    db = wal_db("ok.db", "CREATE TABLE t (id TEXT PRIMARY KEY)")
    spec = tmp_path / "cluster.yaml"
    spec.write_text(external_nats_spec("clitest", ["nats://127.0.0.1:1", "nats://127.0.0.1:2", "nats://127.0.0.1:3"],
                                       {"n1": db}, replication=REPLICATION))
    args = [str(db) if a == "DB" else str(spec) if a == "SPEC" else a for a in args]
    assert_clean_error(run_cli("node", *args), fragment)


async def test_spec_mode_nodes_replicate_and_stop_gracefully(nats_cluster, wal_db, tmp_path):
    schema = "CREATE TABLE kv (k TEXT PRIMARY KEY, v)"
    dbs = {"n1": wal_db("s1.db", schema), "n2": wal_db("s2.db", schema)}
    ports = dict(zip(dbs, free_ports(2)))
    spec = tmp_path / "cluster.yaml"
    spec.write_text(external_nats_spec("clitest", nats_cluster.urls, dbs, ports, replication=REPLICATION))
    nodes = {name: SubprocessNode.from_spec(spec, name, db, tmp_path / f"{name}.log", ports[name])
             for name, db in dbs.items()}
    try:
        for node in nodes.values():
            node.start()
        for node in nodes.values():
            await node.wait_healthy()
        execute(dbs["n1"], "INSERT INTO kv VALUES ('a', 1)")
        execute(dbs["n2"], "INSERT INTO kv VALUES ('b', x'00ff')")
        await wait_converged(list(dbs.values()))
        assert table_rows(dbs["n1"], "kv") == [("a", 1), ("b", b"\x00\xff")]
        # Commit, then SIGTERM at once: the graceful drain publishes it before exiting 0.
        execute(dbs["n2"], "INSERT INTO kv VALUES ('last', 2)")
        assert nodes["n2"].terminate() == 0
        await wait_until(lambda: ("last", 2) in table_rows(dbs["n1"], "kv"), what="the drained row on n1")
    finally:
        for node in nodes.values():
            node.terminate()
    log_text = (tmp_path / "n2.log").read_text()
    assert "Traceback" not in log_text, log_text


async def test_cleanup_removes_bookkeeping_and_keeps_user_data(nats_server, wal_db):
    db = wal_db("c.db", "CREATE TABLE t (id TEXT PRIMARY KEY, v); INSERT INTO t VALUES ('keep', 1);")
    conn = sqlite3.connect(db)
    original = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
    conn.close()
    node = InProcessNode(1, db, nats_server.url, shards=1, replicas=1)
    await node.start()
    execute(db, "INSERT INTO t VALUES ('also', 2)")
    await node.stop()
    conn = sqlite3.connect(db)
    before = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
    conn.close()
    assert any(name.startswith("_marmot_") for name in before)
    result = run_cli("node", "-cleanup", "-db-path", str(db))
    assert result.returncode == 0, result.stderr
    conn = sqlite3.connect(db)
    after = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
    rows = conn.execute("SELECT * FROM t ORDER BY id").fetchall()
    conn.close()
    assert after == original
    assert rows == [("also", 2), ("keep", 1)]
    # Writes keep working without the triggers.
    execute(db, "INSERT INTO t VALUES ('after', 3)")


def test_seed_flags_snapshot_more_often_than_the_log_is_truncated(tmp_path):
    from marmot_appliance.node.config import config_from_flags

    config = config_from_flags(str(tmp_path / "a.db"), 1, "nats://127.0.0.1:4222")  # seed default: 1024 entries
    snapshots, replication = config.cluster.snapshots, config.cluster.replication
    assert snapshots.enabled and snapshots.every_entries < replication.max_log_entries == 1024
