"""Property: random writes on three nodes, random restarts and duplicate deliveries converge,
and no node loses its own writes."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import settled
from tests.replication_cluster import InProcessNode, execute, table_rows, wait_converged

SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY, v, who INTEGER)"
NODE_IDS = (1, 2, 3)
SHARDS = 2

values = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False),
                   st.text(max_size=20), st.binary(max_size=20))
node_ids = st.sampled_from(NODE_IDS)
private_key = st.integers(0, 4)
shared_key = st.sampled_from(["s0", "s1", "s2"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), node_ids, private_key, values),
        st.tuples(st.just("del"), node_ids, private_key, st.none()),
        st.tuples(st.just("put-shared"), node_ids, shared_key, values),
        st.tuples(st.just("del-shared"), node_ids, shared_key, st.none()),
        st.tuples(st.just("restart"), node_ids, st.none(), st.none()),
        st.tuples(st.just("duplicate"), st.integers(1, SHARDS), st.none(), st.none()),
        st.tuples(st.just("pause"), st.none(), st.none(), st.none()),
    ),
    min_size=5,
    max_size=25,
)


async def _republish_last(urls: list[str], stream: str, subject: str) -> None:
    """A duplicate delivery: the stream's last message again, under a new Nats-Msg-Id."""
    nc = await nats.connect(urls, connect_timeout=10)
    try:
        js = nc.jetstream(timeout=10)
        info = await settled(lambda: js.stream_info(stream))
        if info.state.messages == 0:
            return
        msg = await js.get_msg(stream, info.state.last_seq)
        headers = dict(msg.headers or {})
        headers["Nats-Msg-Id"] = f"dup-{uuid.uuid4().hex}"
        # On the original subject: it carries the origin's token (`subject` is the shard's).
        await js.publish(msg.subject or subject, msg.data, headers=headers)
    finally:
        await nc.close()


async def _scenario(cluster, root, ops) -> None:
    run = uuid.uuid4().hex[:8]  # fresh streams and files per example, one NATS cluster for all
    dbs = {}
    for node_id in NODE_IDS:
        path = root / f"{run}-n{node_id}.db"
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        conn.close()
        dbs[node_id] = path
    nodes = {i: InProcessNode(i, dbs[i], cluster.url, shards=SHARDS) for i in NODE_IDS}
    prefix = f"prop-{run}"
    for node in nodes.values():
        node.extra["prefixes"] = prefix
    expected: dict[str, tuple] = {}  # private keys: the owner's last write wins, always
    try:
        for node in nodes.values():
            await node.start()
        for op, who, key, value in ops:
            if op == "put":
                name = f"p{who}-{key}"
                execute(dbs[who], "INSERT INTO kv VALUES (?, ?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                        (name, value, who))
                expected[name] = (name, value, who)
            elif op == "del":
                name = f"p{who}-{key}"
                execute(dbs[who], "DELETE FROM kv WHERE k = ?", (name,))
                expected.pop(name, None)
            elif op == "put-shared":
                execute(dbs[who], "INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (key, value, who))
            elif op == "del-shared":
                execute(dbs[who], "DELETE FROM kv WHERE k = ?", (key,))
            elif op == "restart":
                await nodes[who].stop()
                await nodes[who].start()
            elif op == "duplicate":
                await _republish_last(cluster.urls, f"{prefix}-s-{who}", f"{prefix}-subj-{who}")
            else:
                await asyncio.sleep(0.05)
        await wait_converged(list(dbs.values()))
        rows = table_rows(dbs[1], "kv")
        private = {r[0]: r for r in rows if r[0].startswith("p")}
        assert private == {k: v for k, v in expected.items()}
    finally:
        for node in nodes.values():
            await node.stop()


@pytest.mark.slow
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=operations)
def test_random_operations_restarts_and_duplicates_converge(nats_cluster, tmp_path, ops):
    asyncio.run(asyncio.wait_for(_scenario(nats_cluster, tmp_path, ops), 240))
