"""Tombstone collection, the cluster side: each node publishes what it has published, and
collects its own tombstones below the horizon every node has passed (docs/capture.md,
"Tombstone collection"; the SQLite side is replication/horizon.py).

One KV bucket, `<stream_prefix>-horizon`, one key per node (`node-<id>`):
  {"published_through": P, "collected_through": C, "at": unix time}
P: every change the node originated at or below P is acknowledged by JetStream, and its later
writes rank above P. C: the horizon it collected its tombstones at.

A round on node N:
  1. put N's own record (P computed now);
  2. read every record: H = min P over the publishing nodes whose record is fresh
     (replication.tombstone_node_timeout_s); a node with no record yet blocks collection;
  3. read each shard stream's last sequence L (after step 2: every change at or below H is at
     or below L);
  4. once N's positions reach L on every stream (this round or a later one), N has applied
     every change at or below H: collect at H.

A node whose record went stale is left out of H (it is down); when it comes back, log rows it
wrote at or below the highest C of any node would be stale on those nodes: they are set aside
(dead letters, never published) and the node is re-seeded from a snapshot instead
(`guard_before_publish`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors

from marmot_appliance.replication import horizon

log = logging.getLogger(__name__)

KV_TIMEOUT_S = 10.0
UNKNOWN_NODES = (
    "the other nodes: flag mode names no node list, so no horizon is safe and tombstones are kept "
    "(run the cluster from a spec to collect them; docs/capture.md)"
)
RESEED_REASON = (
    "written while this node was down past the tombstone horizon (replication.tombstone_node_timeout_s): "
    "other nodes already collected the tombstones it could be ordered against; set aside, the node was re-seeded"
)


def horizon_bucket_name(stream_prefix: str) -> str:
    return f"{stream_prefix}-horizon"


def node_key(node_id: int) -> str:
    return f"node-{int(node_id)}"


@dataclass
class CollectorState:
    """What `status` and /health show about collection on this node."""

    published_through: int = 0
    horizon: int = 0  # stored on this node (collected through)
    cluster_horizon: int = 0  # the H of the last round
    collected_total: int = 0
    last_round: float | None = None
    waiting_for: list[str] = field(default_factory=list)  # nodes without a record: no collection
    stale_nodes: list[str] = field(default_factory=list)  # left out of H (record too old)
    reseeded: dict = field(default_factory=dict)  # {"at", "rows_set_aside", "snapshot"} after a re-seed
    error: str | None = None

    def as_status(self) -> dict:
        return {
            "published_through": self.published_through, "horizon": self.horizon,
            "cluster_horizon": self.cluster_horizon, "collected_total": self.collected_total,
            "last_round": self.last_round, "waiting_for": list(self.waiting_for),
            "stale_nodes": list(self.stale_nodes), "reseeded": dict(self.reseeded), "error": self.error,
        }


class TombstoneCollector:
    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.replication = runtime.replication
        self.state = CollectorState()
        self._kv: Any = None
        # (H, {stream: last seq}) waiting for this node's positions to reach every L.
        self._candidate: tuple[int, dict[str, int]] | None = None

    @property
    def db(self) -> str:
        return str(self.runtime.config.db_path)

    async def _bucket(self) -> Any:
        if self._kv is None:
            js = self.runtime.js
            name = horizon_bucket_name(self.replication.stream_prefix)
            try:
                self._kv = await asyncio.wait_for(js.key_value(name), KV_TIMEOUT_S)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await asyncio.wait_for(
                    js.create_key_value(bucket=name, history=1, replicas=self.runtime.cluster.effective_log_replicas),
                    KV_TIMEOUT_S,
                )
        return self._kv

    async def records(self) -> dict[int, dict]:
        kv = await self._bucket()
        out: dict[int, dict] = {}
        for node in self.runtime.cluster.nodes:
            try:
                entry = await asyncio.wait_for(kv.get(node_key(node.id)), KV_TIMEOUT_S)
            except nats.js.errors.KeyNotFoundError:
                continue
            try:
                out[node.id] = json.loads(entry.value)
            except (TypeError, ValueError):
                log.warning("horizon record of node %s is unreadable; ignored", node.name)
        return out

    async def _put_own(self) -> None:
        published = await self.runtime.capture_db.run(horizon.published_through, self.db)
        stored = await self.runtime.apply_db.run(stored_horizon_of, self.db)
        self.state.published_through, self.state.horizon = published, stored
        record = {"published_through": published, "collected_through": stored, "at": time.time()}
        kv = await self._bucket()
        await asyncio.wait_for(kv.put(node_key(self.runtime.node.id), json.dumps(record).encode()), KV_TIMEOUT_S)

    # -- start-up guard ----------------------------------------------------------------------

    async def guard_before_publish(self) -> int:
        """Before the start-up flush: set aside log rows other nodes would order against
        collected tombstones, and re-seed from a snapshot if any were found. Returns the rows
        set aside (0 normally)."""
        try:
            records = await self.records()
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            log.warning("cannot read the tombstone horizon before publishing (%s); holding nothing back", exc)
            return 0
        others = [rec for node_id, rec in records.items() if node_id != self.runtime.node.id]
        highest = max((int(rec.get("collected_through", 0)) for rec in others), default=0)
        unsafe = await self.runtime.capture_db.run(horizon.unsafe_pending, self.db, highest)
        if not unsafe:
            return 0
        moved = await self.runtime.capture_db.run(horizon.set_aside_unsafe_pending, self.db, highest, RESEED_REASON)
        log.error(
            "%d local change(s) were written at or below the cluster's tombstone horizon %d while this node was "
            "down; set aside as dead letters, re-seeding from a snapshot", moved, highest,
        )
        self.state.reseeded = {"at": time.time(), "rows_set_aside": moved, "horizon": highest, "snapshot": None}
        self.runtime.metrics.inc("reseeds")
        self.runtime.metrics.inc("dead_letters", moved)
        return moved

    # -- rounds ------------------------------------------------------------------------------

    async def run_round(self) -> int:
        """One round; returns tombstones collected (0 when it could not collect yet)."""
        runtime = self.runtime
        await self._put_own()
        records = await self.records()
        now = time.time()
        if not runtime.cluster.nodes_known:
            # A horizon from this node's record alone lets the applier drop a peer's delayed
            # write as stale (tests/test_tombstone_flag_mode.py): collect nothing.
            self.state.waiting_for, self.state.stale_nodes = [UNKNOWN_NODES], []
            self.state.last_round = time.time()
            return 0
        timeout = self.replication.tombstone_node_timeout_s
        published, waiting, stale = [], [], []
        for node in runtime.cluster.nodes:
            if not node.publish:
                continue
            record = records.get(node.id)
            if record is None:
                waiting.append(node.name)
            elif now - float(record.get("at", 0)) > timeout:
                stale.append(node.name)
            else:
                published.append(int(record.get("published_through", 0)))
        self.state.waiting_for, self.state.stale_nodes = waiting, stale
        self.state.last_round = now
        collected = 0
        if not runtime.node.replicate:
            return 0  # applies nothing: its versions hold only its own writes
        positions = await runtime.apply_db.run(runtime.applier.positions)
        if self._candidate is not None:
            candidate, lasts = self._candidate
            if all(positions.get(stream, 0) >= last for stream, last in lasts.items()):
                outcome = await runtime.apply_db.run(horizon.collect_tombstones, self.db, candidate)
                collected = outcome.collected
                self.state.horizon = outcome.horizon
                self.state.collected_total += collected
                if collected:
                    runtime.metrics.inc("tombstones_collected", collected)
                    log.info("collected %d tombstone(s) at or below horizon %d", collected, outcome.horizon)
                self._candidate = None
        if waiting or not published:
            return collected
        cluster_horizon = min(published)
        self.state.cluster_horizon = cluster_horizon
        if self._candidate is None and cluster_horizon > self.state.horizon:
            from marmot_appliance.snapshots.restore import stream_bounds

            bounds = await stream_bounds(runtime.js, runtime.cluster)
            self._candidate = (cluster_horizon, {stream: last for stream, (_first, last) in bounds.items()})
        return collected


def stored_horizon_of(db_path: str) -> int:
    from marmot_appliance.replication.sqlite_util import connect

    conn = connect(db_path, readonly=True)
    try:
        return horizon.stored_horizon(conn)
    finally:
        conn.close()
