"""The continuous convergence check: every `verify.interval_s` a node compares the cluster's copies.

Each round runs the same comparison as `marmot-appliance verify` (verify/compare.py) from the
node's own NATS connection, bounded by the interval, and keeps its verdict per table:

- diverged: `/health` answers HTTP 503 with `"diverged": {table: {"keys", "sample", "since",
  "newest_nodes"}}`, `status` prints it, `marmot_diverged_keys{table}` counts the keys. So a
  divergence shows within two intervals (one round may start just before it happens).
- converged: the table's entry is cleared.
- could not decide (a node unreachable, still catching up): the previous verdict stands; the
  round is counted as `marmot_verify_checks_total{result="undecided"}`.

With `verify.auto_repair`, the lowest-id node that answered repairs what it found (the same
path as `marmot-appliance repair`), so only one node re-publishes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from marmot_appliance.observability.families import VERIFY_FAMILIES
from marmot_appliance.retry import sleep_or_stop
from marmot_appliance.verify.client import VerifyClient
from marmot_appliance.verify.compare import CONVERGED, DEFAULT_BUCKETS, DIVERGED, VerifyReport, verify_cluster
from marmot_appliance.verify.report import finding_to_json

log = logging.getLogger(__name__)

SAMPLE_KEYS = 3
MAX_ROUND_S = 300.0


class ContinuousVerify:
    def __init__(self, nc: Any, cluster: Any, node: Any, status: Any, metrics: Any):
        self.cluster = cluster
        self.node = node
        self.status = status
        self.metrics = metrics
        self.interval_s = float(cluster.verify.interval_s)
        self.client = VerifyClient(nc, cluster.replication.stream_prefix)
        metrics.declare_all(VERIFY_FAMILIES)  # listed on /metrics only where the check runs

    def _expected(self) -> list[tuple[str, int]] | None:
        nodes = [n for n in self.cluster.nodes if n.replicate]
        return [(n.name, n.id) for n in nodes] if len(self.cluster.nodes) > 1 else None

    async def run(self, stop: asyncio.Event) -> None:
        # Start at a random point of the first interval so the nodes do not all check at once.
        delay = self.interval_s * random.uniform(0.5, 1.0)
        while True:
            if await sleep_or_stop(stop, delay):
                return
            delay = self.interval_s
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one failed round must not stop the next
                self.metrics.inc("verify_checks", result="error")
                log.warning("convergence check failed: %s", exc)

    async def check_once(self) -> VerifyReport:
        timeout_s = min(self.interval_s, MAX_ROUND_S)
        report = await verify_cluster(self.client, self._expected(), None, timeout_s)
        self.record(report)
        if self.cluster.verify.auto_repair and report.exit_code == 1 and self._repairs_here(report):
            from marmot_appliance.verify.repair import repair_cluster

            log.warning("auto_repair: repairing diverged keys")
            outcome = await repair_cluster(self.client, self._expected(), None, timeout_s, DEFAULT_BUCKETS)
            if outcome.after is not None:
                self.record(outcome.after)
        return report

    def _repairs_here(self, report: VerifyReport) -> bool:
        ids = [n.id for n in report.nodes if n.publish]
        return bool(ids) and min(ids) == self.node.id

    def record(self, report: VerifyReport) -> None:
        now = time.time()
        self.status.verify = {"checked_at": now, "result": report.result, "unreachable": list(report.unreachable)}
        self.metrics.inc("verify_checks", result=report.result)
        for table in report.tables:
            if table.status == DIVERGED:
                previous = self.status.diverged.get(table.table) or {}
                self.status.diverged[table.table] = {
                    "keys": table.differing_keys,
                    "sample": [finding_to_json(f) for f in table.findings[:SAMPLE_KEYS]],
                    "since": previous.get("since", now),
                    "checked_at": now,
                }
                self.metrics.set("diverged_keys", table.differing_keys, table=table.table)
                log.error("convergence check: table %s diverged, %d key(s) differ (run `marmot-appliance repair`)",
                          table.table, table.differing_keys)
            elif table.status == CONVERGED:
                if self.status.diverged.pop(table.table, None) is not None:
                    log.info("convergence check: table %s converged again", table.table)
                self.metrics.set("diverged_keys", 0, table=table.table)
