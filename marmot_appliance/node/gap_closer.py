"""Closing a gap no snapshot closes: every other node publishes its own rows again.

A consumer that finds stream entries gone before it applied them holds before the gap and the
runtime asks the cluster for a snapshot that covers it (node/runtime.py, `_on_truncated`). When
none comes — snapshots are off, or every node fell behind the retention at once so that no node
can save one (docs/reliability.md, finding 2) — the node closes the gap without a snapshot,
once it has waited REPUBLISH_AFTER_S for one:

1. For every other publishing node P of the spec, it reads the last entry L_P of each gapped
   stream, then asks P, over the verify service (op `relog`), to log again the newest version
   of every row it originated, tombstones included (the same path a re-created stream takes,
   capture.relog_own_rows). P answers once those rows are committed to its change log.
2. With every answer in, each gapped consumer whose stream still starts at or below
   R = min_P L_P + 1 stores position (first retained entry - 1) and goes on from there. (If the
   stream rolled past R meanwhile, the nodes are asked again.)

Why nothing is lost. Take a gone entry e, published by node P, carrying version v of key K.
If e was published after L_P was read, it is at or above R and still retained: applied as
usual. Otherwise e's rows were in P's file before P logged its rows again. The newest version
of K any node holds is held by the node that wrote it (a node's copy of a key changes only to a
newer version, and the writer had it first), so after step 1 that newest version — v or newer
— sits in its writer's change log (or this node wrote it: then it is in this file). Its log row
was committed after that writer's L was read, and a stream only appends, so it is published
after L, at or above R, where this consumer applies it; last writer wins makes the copies
harmless on every node that had them. Tombstones collected elsewhere are the exception (gone from their writer's
file, so not re-published): closing is refused while any node has collected tombstones past
this node's own horizon (every version at or below that horizon was applied here), and the node
keeps holding for a snapshot or an operator.

Fail closed everywhere else: flag mode names no node list (no closing); a node that does not
answer keeps the gap open, retried every RETRY_S, and `status`/`/health` name it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import nats.errors

from marmot_appliance.errors import MarmotError
from marmot_appliance.replication.consumer import ResumeAfter

log = logging.getLogger(__name__)

REPUBLISH_AFTER_S = 20.0  # a snapshot gets this long to close the gap first
RETRY_S = 15.0
RELOG_TIMEOUT_S = 120.0  # logging every own row of a large database takes a while
UNKNOWN_NODES = (
    "flag mode names no node list, so the gap cannot be closed by re-publishing; "
    "an operator must restore a snapshot (docs/replication.md, 'Gaps')"
)


class GapCloser:
    """One per node runtime; `decide` is called by the runtime for every look at a held gap."""

    def __init__(self, runtime: Any):
        self.runtime = runtime
        self._first_seen: dict[str, float] = {}  # stream -> time.monotonic() the gap was first seen
        self._ready: dict[str, int] = {}  # stream -> R: go on if the stream still starts at or below R
        self._answered: dict[int, dict[str, int]] = {}  # node id -> the last entries read before it re-logged
        self._task: asyncio.Task | None = None
        self._next_try = 0.0
        self._state = ""

    def decide(self, stream: str, available: int) -> ResumeAfter | str:
        """A ResumeAfter when the gap on `stream` may be passed (its first retained entry is
        `available`); otherwise what the node is doing about it, for `status`."""
        now = time.monotonic()
        limit = self._ready.pop(stream, None)
        if limit is not None and available <= limit:
            self._first_seen.pop(stream, None)
            self.runtime.metrics.inc("gaps_closed_by_republish")
            return ResumeAfter(available - 1, "every other publishing node published its rows again after entry "
                                              f"{limit - 1}")
        # (available > limit: the stream rolled past where the re-published rows begin: ask again.)
        if not self.runtime.cluster.nodes_known:
            return UNKNOWN_NODES
        since = self._first_seen.setdefault(stream, now)
        if self._task is not None and not self._task.done():
            return "asking every other node to publish its rows again"
        if now - since < REPUBLISH_AFTER_S:
            return f"if none arrives within {REPUBLISH_AFTER_S - (now - since):.0f}s, every other node is asked to publish its rows again"
        if now >= self._next_try:
            self._task = asyncio.get_running_loop().create_task(self._ask_everyone(), name="gap-closer")
        return self._state or "asking every other node to publish its rows again"

    def forget(self) -> None:
        """Every gap is closed (or the file was replaced): start afresh next time."""
        self._first_seen.clear()
        self._ready.clear()
        self._answered.clear()
        self._state = ""

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # -- the asking --------------------------------------------------------------------------

    async def _ask_everyone(self) -> None:
        runtime = self.runtime
        try:
            gapped = sorted(runtime.status.gaps)
            problem = await self._collected_past_us()
            if problem:
                self._state = problem
                return
            limits, missing = await self._relog_on_every_peer(gapped)
            if missing:
                self._state = f"waiting for node(s) to publish their rows again: {'; '.join(missing)}; retrying"
                log.warning("gap: %s", self._state)
                return
            self._ready.update(limits)
            self._state = "every other node published its rows again; continuing on the next look"
            log.warning("gap: every other publishing node logged its rows again; streams may go on from %s", limits)
        except (MarmotError, nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
            self._state = f"cannot ask the other nodes yet ({exc}); retrying"
            log.warning("gap: %s", self._state)
        finally:
            self._next_try = time.monotonic() + RETRY_S

    async def _stream_bounds(self, streams: list[str]) -> dict[str, tuple[int, int]]:
        from marmot_appliance.snapshots.restore import stream_bounds

        bounds = await stream_bounds(self.runtime.js, self.runtime.cluster)
        return {stream: (int(bounds[stream][0]), int(bounds[stream][1])) for stream in streams if stream in bounds}

    async def _collected_past_us(self) -> str | None:
        """Why closing is unsafe (a delete this node missed may be gone everywhere), or None."""
        from marmot_appliance.node.tombstone_collector import stored_horizon_of

        runtime = self.runtime
        own = await runtime.apply_db.run(stored_horizon_of, str(runtime.config.db_path))
        records = await runtime.tombstones.records()
        past = sorted(
            node.name for node in runtime.cluster.nodes
            if node.id != runtime.node.id and int((records.get(node.id) or {}).get("collected_through", 0)) > own
        )
        if not past:
            return None
        return (f"cannot close it without a snapshot: node(s) {', '.join(past)} collected tombstones past this "
                f"node's horizon ({own}), so a delete in the gap may be gone from every file; restore a snapshot")

    async def _relog_on_every_peer(self, streams: list[str]) -> tuple[dict[str, int], list[str]]:
        """Ask each other publishing node to log its rows again, each right after reading the
        gapped streams' last entries. Returns ({stream: R}, the nodes that did not, with why):
        everything the gone entries carried is published at or above R."""
        from marmot_appliance.verify import protocol
        from marmot_appliance.verify.client import VerifyClient

        runtime = self.runtime
        client = VerifyClient(runtime.nc, runtime.replication.stream_prefix)
        bounds = await self._stream_bounds(streams)
        answers: list[dict[str, int]] = []
        missing = []
        for peer in runtime.cluster.nodes:
            if peer.id == runtime.node.id or not peer.publish:
                continue
            lasts = self._answered.get(peer.id)
            if lasts is None or any(first > lasts.get(stream, -1) + 1 for stream, (first, _last) in bounds.items()):
                # Not asked yet, or what it re-published may have rolled out since: ask (again).
                lasts = {stream: last for stream, (_first, last) in (await self._stream_bounds(streams)).items()}
                try:
                    body = await client.request(peer.id, {"op": protocol.OP_RELOG}, RELOG_TIMEOUT_S)
                except protocol.VerifyProtocolError as exc:
                    missing.append(f"{peer.name} ({exc})")
                    continue
                self._answered[peer.id] = lasts
                log.info("gap: node %s logged %s row(s) again", peer.name, body.get("relogged"))
            answers.append(lasts)
        # No other publishing node: the gone entries were this node's own (its rows are here).
        limits = {stream: min((lasts.get(stream, 0) + 1 for lasts in answers), default=first)
                  for stream, (first, _last) in bounds.items()}
        return limits, missing
