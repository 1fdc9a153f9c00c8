"""Consume one shard stream and apply its batches in stream order, exactly once.

The consumer starts at the stored applied position + 1 (an ordered push consumer, ack none,
flow control and heartbeats, created with DeliverByStartSequence). Each message is applied by
`BatchApplier.apply`, which writes rows and the new position in one SQLite transaction, so a
crash at any instant neither loses nor doubles an effect. Per message:

* seq <= applied position: a duplicate delivery, dropped;
* seq > applied position + 1: the log was truncated below us (retention), the node must restore
  a snapshot; `on_truncated` decides: True means the runtime took over (a restore is under way)
  and this consumer *holds* (applies nothing) until the runtime stops it and restarts it from
  the restored position (`restart_from`); False means no snapshot closes the gap yet: the
  consumer holds with an open *gap* (shown on /health, `marmot_stream_gap_entries`), never
  moves its position past it, and looks again every GAP_RETRY_S (the runtime has asked the
  cluster for a snapshot that covers it). A `ResumeAfter(p)` answer means every row the gone
  entries carried was published again after entry p (node/gap_closer.py): the position moves
  to p and the consumer goes on. The same holds when the idle check finds the entries
  after our position gone without a message to tell (a purged stream);
* the database was replaced underneath (applier.DatabaseReplacedError, the position fence):
  nothing was written; the consumer holds and tells the runtime (`on_replaced`), which adopts
  the file and restarts every consumer from its positions;
* before each subscription (and at idle checks): a stream that is another instance than the one
  the position counts in (re-created), or that ends below the position, resets the position to
  0 in the new instance (`_check_instance`, reported through `on_reset`);
* undecodable payload or a permanent apply error: dead-lettered with the reason, replication
  continues;
* SQLITE_BUSY / locked and other transient errors: retried with bounded exponential backoff.

A watchdog re-creates the subscription when the stream has messages for us but nothing arrives
(the ordered consumer's own recovery can stall across a long NATS outage).

The parts: replication/consumer_messages.py (each message at the position, gaps),
consumer_gather.py (which messages share a transaction), consumer_retry.py and
consumer_errors.py (what is retried, what is dead-lettered).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication.applier import BatchApplier, DatabaseReplacedError
from marmot_appliance.replication.consumer_errors import ConsumerStopping, is_environment, is_transient
from marmot_appliance.replication.consumer_gather import gather
from marmot_appliance.replication.consumer_messages import ResumeAfter, ShardMessages, TruncationHandler
from marmot_appliance.replication.consumer_retry import consumer_backoff
from marmot_appliance.replication.db_thread import DbThread
from marmot_appliance.replication.own_publishes import OwnPublishes
from marmot_appliance.replication.streams import stream_instance
from marmot_appliance.replication.types import ConsumerStatus
from marmot_appliance.retry import sleep_or_stop

__all__ = [
    "ConsumerStopping",
    "ReplacedHandler",
    "ResetHandler",
    "ResumeAfter",
    "ShardConsumer",
    "TruncationHandler",
    "is_environment",
    "is_transient",
]

log = logging.getLogger(__name__)

IDLE_CHECK_S = 1.0
STALL_CHECKS = 3  # idle checks with lag and no delivery before the subscription is re-created
HEARTBEAT_S = 2.0

ReplacedHandler = Callable[[str], None]
ResetHandler = Callable[[str, str, int], Awaitable[None]]  # (stream, reason, previous position)


class ShardConsumer(ShardMessages):
    """Keeps one subscription to a shard stream delivering from the position (ShardMessages
    applies what it delivers): resubscribes after NATS trouble, a stall, a restore or a gap."""

    def __init__(
        self,
        js: JetStreamContext,
        applier: BatchApplier,
        db: DbThread,
        stream: str,
        subject: str,
        node_id: int,
        metrics: Metrics,
        status: ConsumerStatus,
        start_position: int,
        own_publishes: OwnPublishes | None = None,
        on_truncated: TruncationHandler | None = None,
        on_replaced: ReplacedHandler | None = None,
        on_reset: ResetHandler | None = None,
    ):
        super().__init__(applier, db, stream, subject, node_id, metrics, status, start_position,
                         own_publishes, on_truncated)
        self.js = js
        self.on_replaced = on_replaced
        self.on_reset = on_reset
        self._instance: str | None = None  # the stream instance checked at the last subscribe
        self._failures = 0
        self._restart_requested = False
        # Subscribed since start or the last restart_from: until then /health says "starting".
        self.subscribed = False

    def restart_from(self, position: int) -> None:
        """The database was replaced (snapshot restore): resubscribe from its stored position."""
        self.position = position
        self._unsaved_own_seq = None
        self._restart_requested = True
        self.holding = None
        self.subscribed = False
        self.status.applied[self.stream] = position

    # -- main loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._retry.stop = stop  # retries of database calls end when the node stops
        while not stop.is_set():
            if self.holding is not None:
                if self.gap is None or time.monotonic() < self._gap_retry_at:
                    await sleep_or_stop(stop, IDLE_CHECK_S)
                    continue
                self.holding = None  # look at the gap again (it stays open until it is closed)
            sub = None
            try:
                await self._check_instance()
                sub = await self._subscribe()
                self.subscribed = True
                await self._consume(sub, stop)
                self._failures = 0
            except asyncio.CancelledError:
                raise
            except ConsumerStopping:
                break
            except DatabaseReplacedError as exc:
                self.hold(str(exc))
                if self.on_replaced is not None:
                    self.on_replaced(self.stream)
            except Exception as exc:  # noqa: BLE001 - NATS trouble: back off, resubscribe from position
                await self._backoff(f"consumer {self.stream}", exc, stop)
            finally:
                if sub is not None:
                    try:
                        await asyncio.wait_for(sub.unsubscribe(), 2.0)
                    except Exception:  # noqa: BLE001 - the connection may be gone; nothing to free
                        pass
        await self._save_own_position()

    async def _subscribe(self) -> JetStreamContext.PushSubscription:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.position + 1,
            idle_heartbeat=HEARTBEAT_S,
        )
        return await self.js.subscribe(
            # Everything the stream holds (every origin's token, and messages stored before
            # per-origin subjects existed); each message's token is checked in _forged.
            ">",
            stream=self.stream,
            ordered_consumer=True,
            config=config,
            pending_msgs_limit=4096,
        )

    async def _consume(self, sub: JetStreamContext.PushSubscription, stop: asyncio.Event) -> None:
        """Apply messages until stop, or return to have the subscription re-created."""
        idle_checks = 0
        while not stop.is_set():
            try:
                msg = await sub.next_msg(timeout=IDLE_CHECK_S)
            except nats.errors.TimeoutError:
                if self._restart_requested:
                    self._restart_requested = False
                    return
                await self._save_own_position()
                lagging = await self._lagging()
                if self.holding is not None or self._restart_requested:
                    self._restart_requested = False
                    return  # the idle check found a gap, or a re-created stream
                if lagging:
                    idle_checks += 1
                    if idle_checks >= STALL_CHECKS:
                        log.warning("stream %s: messages pending but none delivered; resubscribing", self.stream)
                        return
                else:
                    idle_checks = 0
                continue
            idle_checks = 0
            if self._restart_requested or self.holding is not None:
                self._restart_requested = False
                return
            group = await gather(sub, msg, node_id=self.node_id, stream=self.stream, metrics=self.metrics,
                                 buffered_wait_s=IDLE_CHECK_S)
            if await self.handle_group(group):
                return

    async def _lagging(self) -> bool:
        """Refresh the lag gauge from the stream; True if messages beyond our position exist.

        Also finds a gap no message would reveal: the entries after our position are gone and
        nothing newer was delivered (a purge). Then the subscription must restart (True) after
        the gap was handled like any other."""
        try:
            info = await self.js.stream_info(self.stream)
        except Exception:  # noqa: BLE001 - reported by the NATS connection state
            return False
        first, last = int(info.state.first_seq or 0), int(info.state.last_seq or 0)
        if last < self.position or self._instance not in (None, stream_instance(info)):
            self._restart_requested = True  # a new stream instance: _check_instance resets us
            return False
        behind = max(0, last - self.position)
        self._set_lag(behind)
        if behind and first > self.position + 1:
            await self._truncated(first)
            return True
        if self.gap is not None and first <= self.position + 1:
            self._close_gap()
        return behind > 0

    async def _check_instance(self) -> bool:
        """Before subscribing: is the stream still the instance our position counts in?

        A stream deleted and re-created (JetStream's store lost, `destroy --purge` then `apply`)
        starts again at sequence 1; with the old position its first messages would be dropped as
        duplicates. So a different instance, or a stream that ends below our position, is a
        reset: the position starts again at 0 in the new instance (one transaction), and the
        runtime is told (it reports it and re-publishes this node's own rows). True on a reset.
        """
        info = await self.js.stream_info(self.stream)
        instance = stream_instance(info)
        last = int(info.state.last_seq or 0)
        stored = await self.db.run(self.applier.stream_instance, self.stream)
        reason = None
        if instance is not None and stored is not None and stored != instance:
            reason = f"stream {self.stream} was re-created (instance {stored} -> {instance})"
        elif last < self.position:
            reason = (f"stream {self.stream} ends at entry {last} but this node applied up to {self.position} "
                      "(its store was lost or replaced)")
        if reason is None:
            if instance is not None and stored != instance:
                await self.db.run(self.applier.record_stream_instance, self.stream, instance)
            self._instance = instance
            return False
        previous = await self.db.run(self.applier.reset_stream, self.stream, instance or stored or "")
        log.error("%s: position reset from %d to 0; replaying it from the start", reason, previous)
        self.metrics.inc("errors", kind="stream_reset")
        self.position = 0
        self._instance = instance
        self._unsaved_own_seq = None
        self.gap = None
        self.status.gaps.pop(self.stream, None)
        self.status.applied[self.stream] = 0
        if self.own_publishes is not None:
            # Sequences acknowledged in the old instance would match new messages by number.
            self.own_publishes.forget_below(self.stream, 2**63)
        if self.on_reset is not None:
            await self.on_reset(self.stream, reason, previous)
        return True

    async def _backoff(self, what: str, exc: BaseException, stop: asyncio.Event) -> None:
        self._failures += 1
        self.metrics.inc("errors", kind="consume")
        delay = consumer_backoff(self._failures)
        level = logging.WARNING if self._failures <= 3 else logging.ERROR
        log.log(level, "%s: %s: %s; retrying in %.2fs", what, type(exc).__name__, exc, delay)
        await sleep_or_stop(stop, delay)
