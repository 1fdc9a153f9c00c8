"""verify's reading side on real SQLite files: every way of listing a bucket's keys agrees.

keys_in_buckets reads the rows a preceding digest placed in the buckets by rowid, or scans the
table once for a whole scope of buckets, or scans it plainly; all must give the same keys and
row hashes, and the digests must not depend on column order or physical row order.
"""

from __future__ import annotations

import sqlite3

import pytest

from marmot_appliance.spec.model import TableSelection
from marmot_appliance.verify.table_state import TableStateReader, bucket_of

TABLES = {
    "alias": "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT, b BLOB)",
    "rowid": "CREATE TABLE t (a TEXT, n INTEGER, v REAL, PRIMARY KEY (a, n))",
    "without_rowid": "CREATE TABLE t (a TEXT, n INTEGER, v REAL, PRIMARY KEY (a, n)) WITHOUT ROWID",
}


def _fill(db, schema: str, rows: int, order: int = 1) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(schema)
    if "k INTEGER" in schema:
        data = [(i, f"v{i}", bytes([i % 256])) for i in range(rows)][::order]
        conn.executemany("INSERT INTO t VALUES (?, ?, ?)", data)
    else:
        data = [(f"a{i % 7}", i, i * 0.5) for i in range(rows)][::order]
        conn.executemany("INSERT INTO t VALUES (?, ?, ?)", data)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_every_listing_path_agrees(tmp_path, kind):
    db = tmp_path / "a.db"
    _fill(db, TABLES[kind], 3000)
    buckets = 64
    wanted = [3, 17, 40]
    plain = TableStateReader(db, 1, TableSelection())
    expected = sorted(plain.keys_in_buckets("t", buckets, wanted)["keys"])
    assert expected and all(bucket_of(tuple(key), buckets) in wanted for key, _ in expected)

    after_digest = TableStateReader(db, 1, TableSelection())
    digest = after_digest.bucket_digests("t", buckets)
    assert digest["rows"] == 3000
    assert sorted(after_digest.keys_in_buckets("t", buckets, wanted)["keys"]) == expected

    scoped = TableStateReader(db, 1, TableSelection())
    scope = [1, 3, 17, 40, 50]
    first = scoped.keys_in_buckets("t", buckets, [3, 17], scope)["keys"]
    second = scoped.keys_in_buckets("t", buckets, [40], scope)["keys"]
    assert sorted(first + second) == expected
    assert sum(digest["counts"][b] for b in wanted) == len(expected)


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_digests_ignore_physical_order_and_see_one_changed_value(tmp_path, kind):
    forward, backward = tmp_path / "f.db", tmp_path / "b.db"
    _fill(forward, TABLES[kind], 500)
    _fill(backward, TABLES[kind], 500, order=-1)
    one = TableStateReader(forward, 1, TableSelection()).bucket_digests("t", 32)
    two = TableStateReader(backward, 2, TableSelection()).bucket_digests("t", 32)
    assert one["sums"] == two["sums"] and one["counts"] == two["counts"]
    conn = sqlite3.connect(backward)
    column = "v"
    conn.execute(f"UPDATE t SET {column} = 1 WHERE rowid = (SELECT min(rowid) FROM t)" if kind != "without_rowid"
                 else "UPDATE t SET v = 1 WHERE a = 'a0' AND n = 0")  # 1 (integer) where there was text/real
    conn.commit()
    conn.close()
    three = TableStateReader(backward, 2, TableSelection()).bucket_digests("t", 32)
    assert one["counts"] == three["counts"]
    assert sum(a != b for a, b in zip(_chunks(one["sums"]), _chunks(three["sums"]))) == 1


def _chunks(packed: bytes) -> list[bytes]:
    return [packed[i:i + 16] for i in range(0, len(packed), 16)]


def test_a_digest_is_reused_until_something_is_committed(tmp_path):
    db = tmp_path / "a.db"
    _fill(db, TABLES["alias"], 200)
    reader = TableStateReader(db, 1, TableSelection())
    first = reader.bucket_digests("t", 16)
    assert reader.bucket_digests("t", 16) == first
    conn = sqlite3.connect(db)
    conn.execute("UPDATE t SET v = 'changed' WHERE k = 5")
    conn.commit()
    conn.close()
    changed = reader.bucket_digests("t", 16)
    assert changed["sums"] != first["sums"]
    plain = TableStateReader(db, 1, TableSelection()).bucket_digests("t", 16)
    assert changed["sums"] == plain["sums"]
