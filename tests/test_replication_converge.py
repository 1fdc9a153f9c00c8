"""Three node runtimes on a real 3-server JetStream cluster (R3 streams) and three database files."""

from __future__ import annotations

import os
import sqlite3
import struct

import pytest

from tests.conftest import skip_or_fail
from tests.replication_cluster import InProcessNode, digest, execute, table_rows, wait_converged, wait_until

SCHEMA = """
CREATE TABLE users (id TEXT PRIMARY KEY, name TEXT, score REAL, avatar BLOB, n INTEGER);
CREATE TABLE "order items" ("order" TEXT, "li""ne" INTEGER, qty INTEGER, PRIMARY KEY ("order", "li""ne"));
"""


@pytest.fixture
async def three_nodes(nats_cluster, wal_db):
    dbs = [wal_db(f"n{i}.db", SCHEMA) for i in (1, 2, 3)]
    nodes = [InProcessNode(i, db, nats_cluster.url) for i, db in zip((1, 2, 3), dbs)]
    for node in nodes:
        await node.start()
    try:
        yield nodes, dbs
    finally:
        for node in nodes:
            await node.stop()


async def test_inserts_updates_deletes_on_every_node_converge(three_nodes):
    nodes, dbs = three_nodes
    for i, db in enumerate(dbs, 1):
        execute(db, "INSERT INTO users VALUES (?, ?, ?, ?, ?)",
                [(f"u{i}-{k}", f"name {k}", k / 3, os.urandom(8), k) for k in range(50)], many=True)
        execute(db, 'INSERT INTO "order items" VALUES (?, ?, ?)', [(f"o{i}", k, k) for k in range(20)], many=True)
    await wait_converged(dbs)
    # Each node updates and deletes rows another node created.
    for i, db in enumerate(dbs, 1):
        other = i % 3 + 1
        execute(db, "UPDATE users SET name = 'changed by ' || ? WHERE id LIKE ?", (i, f"u{other}-1%"))
        execute(db, "DELETE FROM users WHERE id LIKE ?", (f"u{other}-2%",))
        execute(db, 'DELETE FROM "order items" WHERE "order" = ? AND "li""ne" < 5', (f"o{other}",))
    final = await wait_converged(dbs)
    rows = table_rows(dbs[0], "users")
    assert len(rows) == 3 * (50 - 11)  # u?-2 and u?-20..29 deleted: 11 per node
    assert {r[1] for r in rows if r[0].startswith("u2-1")} == {"changed by 1"}
    assert len(table_rows(dbs[0], "order items")) == 3 * 15
    assert all(digest(db) == final for db in dbs)
    assert all(n.runtime.metrics.get("rows_published") > 0 for n in nodes)
    assert all(n.runtime.metrics.get("rows_applied") > 0 for n in nodes)


async def test_every_storage_class_arrives_bit_exact(three_nodes):
    nodes, dbs = three_nodes
    big_text = "".join(chr(0x20 + (i * 7919) % 0x5E) for i in range(1_000_000))  # 1 MB of text
    values = [
        ("blob", None, None, bytes(range(256)) * 4, None),
        ("floats", "0.1", 0.1, None, None),
        ("negzero", None, -0.0, -0.0, None),
        ("tiny", None, 5e-324, None, None),
        ("huge", None, 1.7976931348623157e308, None, 2**63 - 1),
        ("minint", None, None, None, -(2**63)),
        ("nulls", None, None, None, None),
        ("text-looks-like-int", "12345", None, b"", 0),
        ("unicode \u00e9\U0001f600\x00inside", "a\x00b", float("inf"), None, 1),
        ("bigtext", big_text, None, None, None),
    ]
    execute(dbs[0], "INSERT INTO users VALUES (?, ?, ?, ?, ?)", values, many=True)

    def arrived() -> bool:
        return all(len(table_rows(db, "users")) == len(values) for db in dbs[1:])

    await wait_until(arrived, what="the rows to replicate")

    def stored(db) -> dict:
        conn = sqlite3.connect(db)
        try:
            return {r[0]: r for r in conn.execute(
                "SELECT id, name, score, avatar, n, typeof(name), typeof(score), typeof(avatar), typeof(n) FROM users")}
        finally:
            conn.close()

    def exact(value):  # floats by their bits: 0.0 and -0.0 differ, so do NaN payloads
        return ("float", struct.pack(">d", value)) if isinstance(value, float) else (type(value).__name__, value)

    source = stored(dbs[0])
    for db in dbs[1:]:
        replica = stored(db)
        assert {k: tuple(map(exact, v)) for k, v in replica.items()} == {k: tuple(map(exact, v)) for k, v in source.items()}
    # SQLite itself turns -0.0 into 0.0 in a REAL column; in a column without affinity it is kept,
    # and must arrive with its sign.
    assert struct.pack(">d", source["negzero"][3]) == struct.pack(">d", -0.0)
    assert source["text-looks-like-int"][5:] == ("text", "null", "blob", "integer")
    assert source["bigtext"][1] == big_text
    assert len({digest(db) for db in dbs}) == 1


async def test_primary_key_update_leaves_no_orphan(three_nodes):
    nodes, dbs = three_nodes
    execute(dbs[0], "INSERT INTO users (id, name) VALUES ('old-key', 'x')")
    await wait_until(lambda: all(table_rows(db, "users") for db in dbs), what="insert to replicate")
    execute(dbs[1], "UPDATE users SET id = 'new-key' WHERE id = 'old-key'")
    await wait_converged(dbs)
    for db in dbs:
        assert [r[0] for r in table_rows(db, "users")] == ["new-key"]


async def test_other_process_and_trusted_schema_off_writes_replicate(three_nodes, tmp_path):
    nodes, dbs = three_nodes
    import shutil
    import subprocess

    sqlite3_cli = shutil.which("sqlite3")
    if sqlite3_cli is None:
        skip_or_fail("the sqlite3 command-line shell is not installed (apt-get install sqlite3)")
    subprocess.run([sqlite3_cli, str(dbs[0]), "INSERT INTO users (id, name, n) VALUES ('from-cli', 'shell', 7);"],
                   check=True, timeout=60)
    conn = sqlite3.connect(dbs[1])
    conn.execute("PRAGMA trusted_schema=OFF")
    with conn:
        conn.execute("INSERT INTO users (id, name, n) VALUES ('untrusted', 'ts-off', 8)")
        conn.execute("UPDATE users SET n = 9 WHERE id = 'untrusted'")
    conn.close()
    await wait_converged(dbs)
    assert {r[0]: r[4] for r in table_rows(dbs[2], "users")} == {"from-cli": 7, "untrusted": 9}
