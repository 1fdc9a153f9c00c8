"""Automatic snapshots: every N entries written cluster-wide and/or on an interval.

Entries are counted from the streams themselves: the sum of the shard streams' last sequences
minus the sum of the newest snapshot's positions is how many entries the newest snapshot lacks,
whichever node wrote them. Every node may run a scheduler; the lease lets one save at a time and
the "already up to date" rule turns the others' attempts into no-ops. The interval is measured on
this node's monotonic clock from the moment it last saw the manifest change, so no node compares
its wall clock with another's.

Saves are also made on request: a node with a gap no kept snapshot closes asks the cluster for
one (snapshots/requests.py), and a scheduler whose node's positions cover the request saves it,
even with `every_entries` and `interval_s` both off (the scheduler runs whenever snapshots are
enabled).

Inside a node the runtime passes `save_lock` and `saving_blocked`: a save never runs while this
node has a snapshot restore pending or running (it would upload a file about to be replaced, or
one whose positions are behind), and a restore waits for a save in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Callable

import nats.errors
from nats.js import JetStreamContext

from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.snapshots.errors import SnapshotError, SnapshotSkipped
from marmot_appliance.snapshots.manifest import SnapshotInfo
from marmot_appliance.snapshots.requests import read_requests, servable_request
from marmot_appliance.snapshots.restore import stream_bounds
from marmot_appliance.snapshots.save import local_positions, open_store, save_snapshot
from marmot_appliance.spec.model import Cluster, Node

log = logging.getLogger(__name__)


class SnapshotScheduler:
    """Run with `await scheduler.run(stop_event)`; `poke()` asks for an early check."""

    def __init__(
        self,
        js: JetStreamContext,
        cluster: Cluster,
        node: Node,
        db_path: str | Path,
        metrics: Metrics | None = None,
        check_interval_s: float = 5.0,
        work_dir: Path | None = None,
        *,
        save_lock: asyncio.Lock | None = None,
        saving_blocked: Callable[[], str | None] | None = None,
    ):
        self.js = js
        self.cluster = cluster
        self.node = node
        self.db_path = Path(db_path)
        self.metrics = metrics
        self.check_interval_s = check_interval_s
        self.work_dir = work_dir
        self.save_lock = save_lock
        self.saving_blocked = saving_blocked or (lambda: None)
        self.settings = cluster.snapshots
        self.newest: SnapshotInfo | None = None
        self.saved = 0  # snapshots this scheduler saved (for status and tests)
        self._seen_generation: int | None = None
        self._seen_at = time.monotonic()
        self._wake = asyncio.Event()

    @property
    def enabled(self) -> bool:
        # Also without every_entries / interval_s: other nodes' snapshot requests are served.
        return self.settings.enabled

    @property
    def last_snapshot(self) -> float | None:
        """Unix time the newest known snapshot was saved (the saving node's clock; for humans)."""
        return self.newest.created if self.newest else None

    def poke(self) -> None:
        """Check now instead of at the next tick (e.g. after a large publish)."""
        self._wake.set()

    async def due(self) -> str | None:
        """Why a snapshot should be saved now, or None."""
        store = await open_store(self.js, self.cluster)
        manifest, _revision = await store.read_manifest()
        self._observe(manifest.newest)
        if self.settings.every_entries:
            bounds = await stream_bounds(self.js, self.cluster)
            covered = self.newest.positions if self.newest else {}
            behind = sum(max(0, last - covered.get(stream, 0)) for stream, (_first, last) in bounds.items())
            if behind >= self.settings.every_entries:
                return f"{behind} entries since the newest snapshot (every_entries: {self.settings.every_entries})"
        if self.settings.interval_s and time.monotonic() - self._seen_at >= self.settings.interval_s:
            return f"no new snapshot for {self.settings.interval_s:g}s (interval_s)"
        requests, _revision = await read_requests(store)
        if requests:
            positions = await asyncio.to_thread(local_positions, self.db_path)
            return servable_request(requests, self.newest, positions, self.node.name)
        return None

    def _observe(self, newest: SnapshotInfo | None) -> None:
        generation = newest.generation if newest else 0
        if generation != self._seen_generation:
            self._seen_generation = generation
            self._seen_at = time.monotonic()
        self.newest = newest
        if self.metrics is not None and newest is not None:
            self.metrics.set(
                "snapshot_age_seconds", max(0.0, time.time() - newest.created)
            )

    async def check_once(self) -> SnapshotInfo | None:
        """Save if due. Returns the snapshot saved, None when not due or skipped."""
        if self.saving_blocked() is not None:
            return None
        reason = await self.due()
        if reason is None:
            return None
        try:
            async with self.save_lock or contextlib.nullcontext():
                blocked = self.saving_blocked()
                if blocked is not None:
                    log.info("snapshot not saved: %s", blocked)
                    return None
                log.info("saving a snapshot: %s", reason)
                info = await save_snapshot(self.js, self.cluster, self.node, self.db_path, work_dir=self.work_dir)
        except SnapshotSkipped as exc:
            log.debug("snapshot not saved: %s", exc)
            self._seen_at = time.monotonic()  # someone else is on it, or nothing new: wait a full interval
            return None
        self.saved += 1
        self._observe(info)
        return info

    async def run(self, stop: asyncio.Event) -> None:
        if not self.enabled:
            return
        while not stop.is_set():
            try:
                await self.check_once()
            except (SnapshotError, nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
                log.warning("automatic snapshot failed: %s", exc)
                if self.metrics is not None:
                    self.metrics.inc("errors", kind="snapshot")
            self._wake.clear()
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.wait(waiters, timeout=self.check_interval_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
