"""A version from the future stops nothing (issue 10 case 10), on real node processes.

A message carrying version 2**63-1 used to pin every receiver's clock: the capture trigger's
`hlc + 1` then overflowed and every application INSERT/UPDATE failed with "datatype mismatch"
on every node, while /health said ok. `1 << 62` dragged every clock some 2,200 years ahead.
Now rows further ahead than replication.max_clock_skew_s (60 s by default) are not applied and
do not move the clock: held until time catches up, dead-lettered when absurd, and /health plus
the metrics name the origin and the skew.
"""

from __future__ import annotations

import time

import nats

from marmot_appliance.replication import codec
from marmot_appliance.replication.types import ChangeBatch, RowChange
from tests.replication_cluster import SubprocessNode, execute, table_rows, wait_until

SCHEMA = "CREATE TABLE t (k TEXT PRIMARY KEY, v);"
FOREIGN_NODE = 9  # a node id none of the test's nodes has


def _row(key: str, version: int) -> RowChange:
    return RowChange("t", "upsert", (key,), ("k", "v"), (key, f"version {version}"), version, FOREIGN_NODE)


async def _publish(url: str, subject: str, *rows: RowChange) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=10)
        payload = codec.encode_batch(ChangeBatch(origin=FOREIGN_NODE, rows=rows))
        await js.publish(subject, payload, headers={codec.ORIGIN_HEADER: str(FOREIGN_NODE)})
    finally:
        await nc.drain()


async def test_versions_from_the_future_neither_pin_clocks_nor_break_application_writes(nats_server, wal_db, tmp_path):
    dbs = [wal_db(f"n{i}.db", SCHEMA) for i in (1, 2, 3)]
    nodes = [SubprocessNode(i, db, nats_server.url, tmp_path / f"n{i}.log", shards=1, replicas=1).start()
             for i, db in zip((1, 2, 3), dbs)]
    try:
        for node in nodes:
            await node.wait_healthy()
        ten_minutes_ahead = int((time.time() + 600) * 1000) << 16
        await _publish(nats_server.url, f"marmot-change-log-1.{FOREIGN_NODE}",
                       _row("pinned", 2**63 - 1), _row("decades", 1 << 62), _row("ahead", ten_minutes_ahead))

        def reported(node: SubprocessNode) -> bool:
            health = node.health() or {}
            skew = health.get("clock_skew") or {}
            return (skew.get("held", {}).get(str(FOREIGN_NODE), {}).get("rows") == 1
                    and skew.get("dead_lettered", {}).get(str(FOREIGN_NODE), {}).get("rows") == 2)

        for node in nodes:
            await wait_until(lambda node=node: reported(node), what=f"node {node.node_id} to report the skew")
            health = node.health()
            assert health["status"] == "unhealthy"  # HTTP 503: it cannot converge with node 9 yet
            assert 500 < health["clock_skew"]["held"][str(FOREIGN_NODE)]["ahead_s"] <= 600
            metrics = node.metrics()
            assert f'marmot_clock_skew_held_rows{{origin="{FOREIGN_NODE}"}} 1' in metrics
            assert f'marmot_clock_skew_seconds{{origin="{FOREIGN_NODE}"}}' in metrics
            assert f'marmot_clock_skew_dead_letters_total{{origin="{FOREIGN_NODE}"}} 2' in metrics
            # Rows dead-lettered one at a time count as dead letters too (the MarmotDeadLetters alert).
            assert "\nmarmot_dead_letters_total 2.0\n" in metrics, metrics

        # Application writes keep working on every node, and replicate.
        for i, db in enumerate(dbs, start=1):
            execute(db, "INSERT INTO t VALUES (?, ?)", (f"local-{i}", "written after the future arrived"))
            execute(db, "UPDATE t SET v = 'updated' WHERE k = ?", (f"local-{i}",))
        expected = [(f"local-{i}", "updated") for i in (1, 2, 3)]
        await wait_until(lambda: all(table_rows(db, "t") == expected for db in dbs), what="local writes everywhere")
        for db in dbs:
            clock = table_rows(db, "_marmot_clock")[0][1]
            assert clock >> 16 < (time.time() + 120) * 1000  # no clock was dragged ahead
    finally:
        for node in nodes:
            node.terminate()


def test_status_text_names_the_skewed_origin():
    from marmot_appliance.appliance.status import _waiting_rows_lines

    health = {"clock_skew": {"max_clock_skew_s": 60.0, "held": {"9": {"rows": 1, "ahead_s": 599.2}},
                             "dead_lettered": {"9": {"rows": 2, "max_ahead_s": 7.0e10}}}, "parked_rows": 3}
    assert _waiting_rows_lines(health) == [
        "    clock skew: node 9 is 599.2s ahead of this node's clock (max 60.0s): 1 row(s) held",
        "    clock skew: 2 row(s) from node 9 dead-lettered (up to 70000000000.0s ahead)",
        "    parked rows: 3 (waiting for a table or column)",
    ]
    assert _waiting_rows_lines({"dead_letters": 0}) == []
