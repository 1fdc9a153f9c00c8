"""The distributions on real nodes (docs/replication.md, "Health and metrics"): publish-ack time
on the origin, apply time and commit-to-visible lag on the receiver. Real nats-server, real
node runtimes, real SQLite files.

Commit-to-visible is checked against a version whose age the test chooses (a message from a
foreign origin whose row was "committed" 30 s ago): it must land between the 25 s and the 60 s
bucket bounds, whatever the machine's speed.
"""

from __future__ import annotations

import time

import nats
from prometheus_client.parser import text_string_to_metric_families

from marmot_appliance.replication import codec
from marmot_appliance.replication.types import ChangeBatch, RowChange
from tests.replication_cluster import InProcessNode, execute, table_rows, wait_until

SCHEMA = "CREATE TABLE t (k TEXT PRIMARY KEY, v);"
FOREIGN_NODE = 9


def _histogram(node: InProcessNode, name: str) -> dict[str, float]:
    """`le` -> cumulative count, plus "count" and "sum", from the node's rendered /metrics."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(node.runtime.metrics.render()):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                out[sample.labels["le"]] = sample.value
            else:
                out[sample.name.rsplit("_", 1)[1]] = sample.value
    return out


async def test_histograms_observe_publish_apply_and_commit_to_visible(nats_server, wal_db):
    dbs = [wal_db(f"h{i}.db", SCHEMA) for i in (1, 2)]
    nodes = [InProcessNode(i, db, nats_server.url, shards=1, replicas=1) for i, db in zip((1, 2), dbs)]
    for node in nodes:
        await node.start()
    try:
        origin, receiver = nodes
        for name in ("marmot_publish_ack_seconds", "marmot_apply_transaction_seconds",
                     "marmot_commit_to_visible_seconds"):
            assert _histogram(receiver, name)["count"] == 0  # listed from start-up, empty

        execute(dbs[0], "INSERT INTO t VALUES (?, ?)", [(f"k{i}", i) for i in range(20)], many=True)
        await wait_until(lambda: len(table_rows(dbs[1], "t")) == 20, what="the rows on the receiver")
        await wait_until(lambda: _histogram(origin, "marmot_publish_ack_seconds")["count"] >= 1,
                         what="the origin's publish round acknowledged and observed")
        acks = _histogram(origin, "marmot_publish_ack_seconds")
        assert acks["+Inf"] == acks["count"] and acks["sum"] > 0
        applied = _histogram(receiver, "marmot_apply_transaction_seconds")
        visible = _histogram(receiver, "marmot_commit_to_visible_seconds")
        assert applied["count"] >= 1 and applied["sum"] > 0
        assert visible["count"] >= 1 and visible["+Inf"] == visible["count"]
        assert _histogram(receiver, "marmot_publish_ack_seconds")["count"] == 0  # it published nothing

        # A row committed on its origin 30 s ago (by its version's clock) becomes visible now.
        before = _histogram(receiver, "marmot_commit_to_visible_seconds")
        thirty_s_ago = int((time.time() - 30) * 1000) << 16
        row = RowChange("t", "upsert", ("late",), ("k", "v"), ("late", 1), thirty_s_ago, FOREIGN_NODE)
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream(timeout=10).publish(
                f"marmot-change-log-1.{FOREIGN_NODE}", codec.encode_batch(ChangeBatch(origin=FOREIGN_NODE, rows=(row,))),
                headers={codec.ORIGIN_HEADER: str(FOREIGN_NODE)})
        finally:
            await nc.drain()
        await wait_until(lambda: ("late", 1) in table_rows(dbs[1], "t"), what="the late row on the receiver")
        await wait_until(lambda: _histogram(receiver, "marmot_commit_to_visible_seconds")["count"] > before["count"],
                         what="the late row observed")
        after = _histogram(receiver, "marmot_commit_to_visible_seconds")
        assert after["10.0"] == before["10.0"]  # not in any bucket up to 10 s ...
        assert after["60.0"] == before["60.0"] + 1  # ... but at most 60 s
        assert after["sum"] - before["sum"] >= 30
    finally:
        for node in nodes:
            await node.stop()
