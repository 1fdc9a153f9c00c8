"""Convergence of capture + apply on three real databases, without NATS in between.

Random writes (inserts, updates, deletes, primary-key changes, multi-row transactions) on three
nodes; batches exchanged in random orders, with duplicates and restarts of the capture/apply
objects. Afterwards every node holds identical tables, and every row equals the highest
(version, origin) change any node made to it (a delete: the row is absent).
"""

from __future__ import annotations

import random
import sqlite3
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marmot_appliance.replication.applier import BatchApplier
from marmot_appliance.replication.capture import ChangeCapture
from marmot_appliance.replication.digest import table_digest
from marmot_appliance.replication.types import ChangeBatch, RowChange
from tests.harness import make_wal_db

SCHEMA = """
CREATE TABLE kv (k TEXT PRIMARY KEY, v);
CREATE TABLE pair (a INTEGER, b TEXT, v, PRIMARY KEY (a, b)) WITHOUT ROWID;
"""
NODE_IDS = (1, 2, 3)

values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
kv_keys = st.sampled_from(["k0", "k1", "k2", "k3"])
pair_keys = st.tuples(st.integers(0, 1), st.sampled_from(["x", "y"]))

write = st.one_of(
    st.tuples(st.just("kv_upsert"), kv_keys, values),
    st.tuples(st.just("kv_delete"), kv_keys),
    st.tuples(st.just("kv_rekey"), kv_keys, kv_keys),
    st.tuples(st.just("pair_upsert"), pair_keys, values),
    st.tuples(st.just("pair_delete"), pair_keys),
    st.tuples(st.just("pair_rekey"), pair_keys, pair_keys),
)
node_index = st.integers(0, len(NODE_IDS) - 1)
step = st.one_of(
    st.tuples(st.just("write"), node_index, st.lists(write, min_size=1, max_size=4)),  # one transaction
    st.tuples(st.just("publish"), node_index),
    st.tuples(st.just("deliver"), node_index, st.integers(0, 10_000)),
    st.tuples(st.just("restart"), node_index),
)


def run_write(conn: sqlite3.Connection, op: tuple) -> None:
    kind = op[0]
    if kind == "kv_upsert":
        conn.execute("INSERT INTO kv VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v", (op[1], op[2]))
    elif kind == "kv_delete":
        conn.execute("DELETE FROM kv WHERE k = ?", (op[1],))
    elif kind == "kv_rekey":
        conn.execute("UPDATE kv SET k = ? WHERE k = ?", (op[2], op[1]))
    elif kind == "pair_upsert":
        (a, b), v = op[1], op[2]
        conn.execute("INSERT INTO pair VALUES (?, ?, ?) ON CONFLICT (a, b) DO UPDATE SET v = excluded.v", (a, b, v))
    elif kind == "pair_delete":
        conn.execute("DELETE FROM pair WHERE a = ? AND b = ?", op[1])
    elif kind == "pair_rekey":
        (a, b), (a2, b2) = op[1], op[2]
        conn.execute("UPDATE pair SET a = ?, b = ? WHERE a = ? AND b = ?", (a2, b2, a, b))


class Node:
    def __init__(self, path: Path, node_id: int):
        self.path = path
        self.node_id = node_id
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.open()

    def open(self) -> None:
        self.capture = ChangeCapture(self.path, self.node_id)
        self.capture.install()
        self.applier = BatchApplier(self.path, self.node_id)

    def restart(self) -> None:
        self.capture.close()
        self.applier.close()
        self.open()

    def close(self) -> None:
        self.capture.close()
        self.applier.close()
        self.conn.close()


def expected_state(changes: list[RowChange]) -> dict[str, dict[tuple, tuple]]:
    """Per table, per key: the values of the winning change (absent when a delete won)."""
    winners: dict[tuple, RowChange] = {}
    for change in changes:
        key = (change.table, change.pk)
        best = winners.get(key)
        if best is None or (change.version, change.origin) > (best.version, best.origin):
            winners[key] = change
    state: dict[str, dict[tuple, tuple]] = {"kv": {}, "pair": {}}
    for (table, pk), change in winners.items():
        if change.op == "upsert":
            state[table][pk] = change.values
    return state


def actual_state(conn: sqlite3.Connection) -> dict[str, dict[tuple, tuple]]:
    return {
        "kv": {(row[0],): row for row in conn.execute("SELECT k, v FROM kv")},
        "pair": {(row[0], row[1]): row for row in conn.execute("SELECT a, b, v FROM pair")},
    }


def canonical(state):
    """Make floats comparable bit for bit (-0.0 vs 0.0) and keep types distinct (1 vs 1.0)."""
    def value(v):
        return (type(v).__name__, v.hex() if isinstance(v, float) else v)

    return {table: {key: tuple(map(value, row)) for key, row in rows.items()} for table, rows in state.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=40), seed=st.integers(0, 2**32 - 1))
def test_random_concurrent_writes_converge_whatever_the_delivery_order(steps, seed):
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        nodes = [Node(make_wal_db(Path(tmp) / f"n{i}.db", SCHEMA), node_id) for i, node_id in enumerate(NODE_IDS)]
        try:
            messages: list[ChangeBatch] = []
            captured: list[RowChange] = []
            fresh_stream = iter(range(10**9))

            def publish(node: Node) -> None:
                pending = node.capture.read_pending(100_000)
                if pending:
                    messages.append(ChangeBatch(origin=node.node_id, rows=tuple(p.change for p in pending)))
                    captured.extend(p.change for p in pending)
                    node.capture.mark_published([p.log_id for p in pending])

            def deliver(node: Node, index: int) -> None:
                # Each message on its own stream name: any order is possible; re-delivery under
                # the same name is a duplicate the position catches, under a new name one that
                # only the version check catches.
                if rng.random() < 0.3:
                    stream = f"again-{next(fresh_stream)}"
                else:
                    stream = f"m{index}"
                node.applier.apply(messages[index], stream, 1)

            for kind, who, *rest in steps:
                node = nodes[who]
                if kind == "write":
                    node.conn.execute("BEGIN")
                    for op in rest[0]:
                        try:
                            run_write(node.conn, op)
                        except sqlite3.IntegrityError:
                            pass  # a key change onto an existing key: the statement is undone
                    node.conn.execute("COMMIT")
                elif kind == "publish":
                    publish(node)
                elif kind == "deliver" and messages:
                    deliver(node, rest[0] % len(messages))
                elif kind == "restart":
                    node.restart()

            for node in nodes:
                publish(node)
            for node in nodes:
                order = list(range(len(messages))) + [rng.randrange(len(messages)) for _ in range(len(messages) // 3)] if messages else []
                rng.shuffle(order)
                for index in order:
                    deliver(node, index)

            digests = [table_digest(node.path) for node in nodes]
            assert digests[0] == digests[1] == digests[2]
            expected = canonical(expected_state(captured))
            for node in nodes:
                assert canonical(actual_state(node.conn)) == expected
                assert node.capture.pending_count() == 0  # applied rows were not re-captured
        finally:
            for node in nodes:
                node.close()


def test_table_digest_ignores_row_order_but_not_values_or_types(tmp_path):
    schema = "CREATE TABLE t (k TEXT PRIMARY KEY, v); CREATE TABLE loose (x);"
    a = make_wal_db(tmp_path / "a.db", schema)
    b = make_wal_db(tmp_path / "b.db", schema)
    rows = [("1", 1), ("2", -0.0), ("3", b"\x00"), ("4", None), ("5", "text")]
    with sqlite3.connect(a) as conn:
        conn.executemany("INSERT INTO t VALUES (?, ?)", rows)
    with sqlite3.connect(b) as conn:
        conn.executemany("INSERT INTO t VALUES (?, ?)", list(reversed(rows)))
    assert table_digest(a) == table_digest(b)
    assert set(table_digest(a)) == {"t", "loose"}
    assert table_digest(a, ["t", "nope"])["nope"] == "missing"
    for changed in ((1.0,), (0.0,), ("1",)):  # 1 -> 1.0 / -0.0 -> 0.0 / int -> text all differ
        with sqlite3.connect(b) as conn:
            key = {"(1.0,)": "1", "(0.0,)": "2", "('1',)": "1"}[repr(changed)]
            original = dict(rows)[key]
            conn.execute("UPDATE t SET v = ? WHERE k = ?", (changed[0], key))
        assert table_digest(a)["t"] != table_digest(b)["t"], changed
        with sqlite3.connect(b) as conn:
            conn.execute("UPDATE t SET v = ? WHERE k = ?", (original, key))
        assert table_digest(a) == table_digest(b)
