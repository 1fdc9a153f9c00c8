"""The continuous convergence check (verify.interval_s) on real runtimes, NATS and SQLite files.

A write that bypassed capture on one replica shows on every node's /health (HTTP 503,
`diverged` with the table) and as `marmot_diverged_keys{table}`; after `repair` it clears.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace

from marmot_appliance.appliance.status import render_status_text
from marmot_appliance.spec.model import VerifySettings
from tests.replication_cluster import InProcessNode, execute, http_get, table_rows, wait_converged, wait_until
from tests.verify_support import run_cli, write_bypassing_capture

SCHEMA = "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT);"


@dataclass
class CheckingNode(InProcessNode):
    interval_s: float = 1.0
    auto_repair: bool = False

    def config(self):
        config = super().config()
        settings = VerifySettings(interval_s=self.interval_s, auto_repair=self.auto_repair)
        return replace(config, cluster=replace(config.cluster, verify=settings))


async def _get(url: str) -> tuple[int, str]:
    # The nodes run in this event loop: never block it.
    return await asyncio.to_thread(http_get, url)


async def test_divergence_shows_on_health_and_metrics_then_clears_after_repair(nats_server, wal_db):
    dbs = [wal_db(f"n{i}.db", SCHEMA) for i in (1, 2, 3)]
    nodes = [CheckingNode(i, db, nats_server.url, shards=2, replicas=1) for i, db in zip((1, 2, 3), dbs)]
    for node in nodes:
        await node.start()
    try:
        execute(dbs[0], "INSERT INTO t VALUES (?, ?)", [(k, f"v{k}") for k in range(100)], many=True)
        await wait_converged(dbs)
        await wait_until(lambda: all(n.runtime.status.verify.get("result") == "converged" for n in nodes),
                         what="a converged check on every node")
        write_bypassing_capture(dbs[1], "UPDATE t SET v = 'edited by hand' WHERE k = 3")

        def reported() -> bool:
            return all("t" in (node.runtime.status.diverged or {}) for node in nodes)

        await wait_until(reported, what="every node to report table t diverged")
        for node in nodes:
            code, body = await _get(node.http_url + "/health")
            health = json.loads(body)
            assert code == 503 and health["status"] == "unhealthy"
            assert health["diverged"]["t"]["keys"] == 1
            assert health["diverged"]["t"]["sample"][0]["key"] == [3]
            _, metrics = await _get(node.http_url + "/metrics")
            assert 'marmot_diverged_keys{table="t"} 1' in metrics
        text = render_status_text(nodes[0].runtime.config.cluster, [await _status_of(nodes[0])])
        assert "diverged: table t: 1 key(s) differ" in text

        code, out, stderr = await run_cli("repair", "--nats-url", nats_server.url, "--expect-nodes", "3")
        assert code == 0, (out, stderr)
        await wait_until(lambda: all(not node.runtime.status.diverged for node in nodes),
                         what="every node to see the table converged again")
        for node in nodes:
            code, body = await _get(node.http_url + "/health")
            assert code == 200, body
            _, metrics = await _get(node.http_url + "/metrics")
            assert 'marmot_diverged_keys{table="t"} 0' in metrics
    finally:
        for node in nodes:
            await node.stop()


async def test_auto_repair_settles_a_divergence_without_an_operator(nats_server, wal_db):
    """verify.auto_repair: the lowest-id node repairs what its round found; the files converge."""
    dbs = [wal_db(f"n{i}.db", SCHEMA) for i in (1, 2, 3)]
    nodes = [CheckingNode(i, db, nats_server.url, shards=2, replicas=1, auto_repair=True)
             for i, db in zip((1, 2, 3), dbs)]
    for node in nodes:
        await node.start()
    try:
        execute(dbs[0], "INSERT INTO t VALUES (?, ?)", [(k, f"v{k}") for k in range(50)], many=True)
        await wait_converged(dbs)
        write_bypassing_capture(dbs[2], "UPDATE t SET v = 'edited by hand' WHERE k = 30")
        write_bypassing_capture(dbs[2], "DELETE FROM t WHERE k = 31")
        await wait_converged(dbs)
        assert ("30", "v30") not in table_rows(dbs[2], "t") and (30, "v30") in table_rows(dbs[2], "t")
        assert (31, "v31") in table_rows(dbs[2], "t")

        def counted(node, result: str) -> float:
            return node.runtime.metrics.get("verify_checks", result=result)

        assert counted(nodes[0], "diverged") >= 1  # node 1 found it (and repaired it)
        await wait_until(lambda: all(not node.runtime.status.diverged for node in nodes),
                         what="every node to see the table converged")
    finally:
        for node in nodes:
            await node.stop()


async def _status_of(node: CheckingNode):
    """A NodeStatus as `status` builds it, from the node's real /health body."""
    from marmot_appliance.appliance import health
    from marmot_appliance.appliance.status import NodeStatus, ProcessStatus

    code, body = await _get(node.http_url + "/health")
    return NodeStatus(f"node-{node.node_id}", ProcessStatus("runtime", None, True), None,
                      health.NodeHealth(code, json.loads(body)), ["unhealthy"])
