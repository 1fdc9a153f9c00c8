"""Closing a gap no snapshot closes: every other node publishes its own rows again.

A consumer that finds stream entries gone before it applied them holds before the gap and the
runtime asks the cluster for a snapshot that covers it (node/runtime.py, `_on_truncated`). When
none comes — snapshots are off, or every node fell behind the retention at once so that no node
can save one (docs/reliability.md, finding 2) — the node closes the gap without a snapshot,
once it has waited REPUBLISH_AFTER_S for one:

1. It reads the first retained entry F of every stream it holds a gap on.
2. It asks every other publishing node of the spec, over the verify service (op `relog`), to
   log again the newest version of every row it originated, tombstones included (the same
   path a re-created stream takes, capture.relog_own_rows). A node answers once those rows are
   committed to its change log.
3. With every answer in, and F unchanged, each gapped consumer stores position F-1 and goes on.

Why nothing is lost. Take an entry e < F carrying version v of key K. The newest version of K
any node holds is held by the node that wrote it (a node's copy of a key changes only to a
newer version, and the writer had it first), so after step 2 that newest version — v or newer —
sits in its writer's change log (or this node wrote it itself: then it is in this file). Its
log row was committed after F was read, and a stream only appends, so it is published after
entry F-1, where this consumer applies it; last writer wins makes the copies harmless on every
node that had them. Tombstones collected elsewhere are the exception (gone from their writer's
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
        self._ready: dict[str, int] = {}  # stream -> F: every node re-logged after F was read
        self._answered: dict[int, dict[str, int]] = {}  # node id -> the F values its relog followed
        self._task: asyncio.Task | None = None
        self._next_try = 0.0
        self._state = ""

    def decide(self, stream: str, available: int) -> ResumeAfter | str:
        """A ResumeAfter when the gap on `stream` may be passed (its first retained entry is
        `available`); otherwise what the node is doing about it, for `status`."""
        now = time.monotonic()
        first = self._ready.pop(stream, None)
        if first is not None and available == first:
            self._first_seen.pop(stream, None)
            self.runtime.metrics.inc("gaps_closed_by_republish", help="Gaps closed by every node publishing its rows again")
            return ResumeAfter(first - 1, f"every other publishing node published its rows again after entry {first - 1}")
        # (first != available: the stream rolled past the re-published rows; they are asked again.)
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
            firsts = await self._first_entries(sorted(runtime.status.gaps))
            problem = await self._collected_past_us()
            if problem:
                self._state = problem
                return
            missing = await self._relog_on_every_peer(firsts)
            if missing:
                self._state = f"waiting for node(s) to publish their rows again: {'; '.join(missing)}; retrying"
                log.warning("gap: %s", self._state)
                return
            self._ready.update(firsts)
            self._state = "every other node published its rows again; continuing on the next look"
            log.warning("gap: every other publishing node logged its rows again after entries %s", firsts)
        except (MarmotError, nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
            self._state = f"cannot ask the other nodes yet ({exc}); retrying"
            log.warning("gap: %s", self._state)
        finally:
            self._next_try = time.monotonic() + RETRY_S

    async def _first_entries(self, streams: list[str]) -> dict[str, int]:
        from marmot_appliance.snapshots.restore import stream_bounds

        bounds = await stream_bounds(self.runtime.js, self.runtime.cluster)
        return {stream: int(bounds[stream][0]) for stream in streams if stream in bounds}

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

    async def _relog_on_every_peer(self, firsts: dict[str, int]) -> list[str]:
        """Ask each other publishing node to log its rows again (after `firsts` were read);
        returns the nodes that did not (with why)."""
        from marmot_appliance.verify import protocol
        from marmot_appliance.verify.client import VerifyClient

        runtime = self.runtime
        client = VerifyClient(runtime.nc, runtime.replication.stream_prefix)
        missing = []
        for peer in runtime.cluster.nodes:
            if peer.id == runtime.node.id or not peer.publish:
                continue
            if self._answered.get(peer.id) == firsts:
                continue  # it re-logged after these very entries were read: enough
            try:
                body = await client.request(peer.id, {"op": protocol.OP_RELOG}, RELOG_TIMEOUT_S)
            except protocol.VerifyProtocolError as exc:
                missing.append(f"{peer.name} ({exc})")
                continue
            self._answered[peer.id] = dict(firsts)
            log.info("gap: node %s logged %s row(s) again", peer.name, body.get("relogged"))
        return missing
