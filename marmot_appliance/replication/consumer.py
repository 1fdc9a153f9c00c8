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
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from marmot_appliance.errors import DatabaseStateError
from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication import codec
from marmot_appliance.replication.applier import DatabaseReplacedError
from marmot_appliance.replication.streams import stream_instance
from marmot_appliance.replication.payload_bounds import MAX_KEPT_PAYLOAD_BYTES
from marmot_appliance.replication.sqlite_util import is_environment_error
from marmot_appliance.replication.streams import origin_of_subject
from marmot_appliance.replication.types import ChangeBatch

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.02
BACKOFF_MAX_S = 5.0
IDLE_CHECK_S = 1.0
# Own messages skipped while caught up store their position at most this often (and on every
# idle check and at shutdown): storing it per message cost the publishing node one write
# transaction per message, competing with the application for the write lock and waking its
# own publisher for an empty read. A position stored late only means a few own messages are
# delivered and skipped again after a crash.
OWN_POSITION_SAVE_S = 0.5
STALL_CHECKS = 3  # idle checks with lag and no delivery before the subscription is re-created
# A gap no snapshot closes yet is looked at again this often (resubscribe: the gap is found
# again, and on_truncated checks for a snapshot that covers it now).
GAP_RETRY_S = 5.0
HEARTBEAT_S = 2.0
MAX_GROUP = 64  # messages applied in one SQLite transaction when several are buffered
# A publisher's run of messages flagged MORE_HEADER is applied in one SQLite transaction (rows
# committed together stay together, DESIGN.md §2.5), past MAX_GROUP if need be, within these
# bounds: a run whose end does not arrive in time (its publisher died or is backing off) or
# that grows past the size cap is applied as far as it got. The cap counts bytes before
# compression: while a publisher is far behind, its rounds stop at their row limit and a run
# goes on round after round; the cap keeps the memory of one group bounded.
OPEN_RUN_WAIT_S = 2.0
MAX_RUN_BYTES = 32 * 1024 * 1024

# sqlite3 errors worth retrying: another writer holds the lock, or the disk is momentarily
# unavailable. Anything else (constraint, type mismatch, malformed SQL) is permanent.
TRANSIENT_SQLITE_MARKERS = ("locked", "busy", "disk i/o", "database or disk is full", "unable to open")

# A lock held this many attempts in a row (several seconds of backoff) counts as blocked too.
BLOCKED_AFTER_ATTEMPTS = 10

@dataclass(frozen=True)
class ResumeAfter:
    """`on_truncated`'s answer when the gap no longer needs its entries: every row they carried
    was published again after `position` (node/gap_closer.py). The consumer stores `position`
    and continues from the next entry."""

    position: int
    reason: str


TruncationHandler = Callable[[str, int, int], Awaitable["bool | ResumeAfter"]]
ReplacedHandler = Callable[[str], None]
ResetHandler = Callable[[str, str, int], Awaitable[None]]  # (stream, reason, previous position)


def _row_count(batch: "ChangeBatch | codec.GroupedBatch") -> int:
    if isinstance(batch, codec.GroupedBatch):
        return batch.row_count
    return len(batch.rows)


async def _decode(payload: bytes) -> "ChangeBatch | codec.GroupedBatch":
    """Decode off the event loop: a large body takes milliseconds, and the loop serves NATS
    heartbeats and /health meanwhile. Every failure is a CodecError (the codec bounds size,
    item count and nesting before it builds anything)."""
    return await asyncio.to_thread(codec.decode_for_apply, payload)


def is_transient(exc: BaseException) -> bool:
    """True for errors of the database or the machine, not of the message: retry, never
    dead-letter. A lock held past busy_timeout, and environment errors (disk full, I/O error,
    read-only file, corruption: the applier raises DatabaseStateError for those) that last as
    long as they last: dead-lettering would lose the rows for nothing."""
    if getattr(exc, "transient", False):  # e.g. sqlite_util.DatabaseBusyError
        return True
    if is_environment(exc):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(marker in text for marker in TRANSIENT_SQLITE_MARKERS)
    return False


def is_environment(exc: BaseException) -> bool:
    """The database cannot be written at all (as opposed to busy for a moment)."""
    return isinstance(exc, DatabaseStateError) or (isinstance(exc, sqlite3.Error) and is_environment_error(exc))


class ConsumerStopping(Exception):
    """The node stops while an apply waits for the database: leave without moving the position."""


class ShardConsumer:
    def __init__(
        self,
        js: JetStreamContext,
        applier: Any,
        db: Any,
        stream: str,
        subject: str,
        node_id: int,
        metrics: Metrics,
        status: Any,
        start_position: int,
        own_publishes: Any = None,
        on_truncated: TruncationHandler | None = None,
        on_replaced: ReplacedHandler | None = None,
        on_reset: ResetHandler | None = None,
    ):
        self.js = js
        self.applier = applier
        self.db = db
        self.stream = stream
        self.subject = subject
        self.node_id = node_id
        self.metrics = metrics
        self.status = status
        self.position = start_position
        self.own_publishes = own_publishes
        self.on_truncated = on_truncated
        self.on_replaced = on_replaced
        self.on_reset = on_reset
        self.holding: str | None = None  # why this consumer applies nothing until restart_from
        self.gap: tuple[int, int] | None = None  # (first, last) entry gone before we applied it
        self._instance: str | None = None  # the stream instance checked at the last subscribe
        self._gap_retry_at = 0.0  # time.monotonic() when a held gap is looked at again
        self._unsaved_own_seq: int | None = None  # own messages skipped, position not yet stored
        self._own_position_saved_at = 0.0  # time.monotonic() of the last _save_own_position
        self._failures = 0
        self._restart_requested = False
        self._stop: asyncio.Event | None = None  # set by run(): retries end when the node stops
        # Subscribed since start or the last restart_from: until then /health says "starting".
        self.subscribed = False
        self.status.applied[stream] = start_position

    def restart_from(self, position: int) -> None:
        """The database was replaced (snapshot restore): resubscribe from its stored position."""
        self.position = position
        self._unsaved_own_seq = None
        self._restart_requested = True
        self.holding = None
        self.subscribed = False
        self.status.applied[self.stream] = position

    def hold(self, reason: str) -> None:
        """Apply nothing more until `restart_from` (the runtime is replacing the database)."""
        if self.holding is None:
            log.warning("stream %s: holding at position %d: %s", self.stream, self.position, reason)
        self.holding = reason
        self._unsaved_own_seq = None  # an own-message position must not land in the new file

    # -- main loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        while not stop.is_set():
            if self.holding is not None:
                if self.gap is None or time.monotonic() < self._gap_retry_at:
                    await _wait_for(stop, IDLE_CHECK_S)
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

    async def _subscribe(self):
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

    async def _consume(self, sub, stop: asyncio.Event) -> None:
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
            group = await self._gather(sub, msg)
            if await self.handle_group(group):
                return

    async def _gather(self, sub, first) -> list:
        """The messages to apply in one SQLite transaction, starting with `first`.

        Messages already buffered join (fewer commits while catching up), up to MAX_GROUP; a
        lone message is applied at once. While some origin's run is open (its last message
        carried MORE_HEADER), the group waits for the run's end, past MAX_GROUP, bounded by
        OPEN_RUN_WAIT_S per message and MAX_RUN_BYTES (before compression).
        """
        group = [first]
        open_runs: set[str] = set()
        self._track_run(open_runs, first)
        size = codec.uncompressed_size(first.data)
        while len(group) < MAX_GROUP or open_runs:
            if sub.pending_msgs > 0:
                wait_s = IDLE_CHECK_S
            elif open_runs:
                wait_s = OPEN_RUN_WAIT_S
            else:
                break
            try:
                msg = await sub.next_msg(timeout=wait_s)
            except nats.errors.TimeoutError:
                self.metrics.inc("runs_split")
                log.info("stream %s: the end of a run from node(s) %s did not arrive within %.0fs; "
                         "applying what arrived", self.stream, ", ".join(sorted(open_runs)), wait_s)
                break
            group.append(msg)
            self._track_run(open_runs, msg)
            size += codec.uncompressed_size(msg.data)
            if size >= MAX_RUN_BYTES:
                self.metrics.inc("runs_split")
                break
        return group

    def _track_run(self, open_runs: set[str], msg) -> None:
        headers = msg.headers or {}
        origin = headers.get(codec.ORIGIN_HEADER, "")
        if origin == str(self.node_id):
            return  # our own messages are skipped, not applied
        if headers.get(codec.MORE_HEADER):
            open_runs.add(origin)
        else:
            open_runs.discard(origin)

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

    def _set_lag(self, behind: int) -> None:
        self.status.lag[self.stream] = behind
        self.metrics.set("stream_lag", behind, stream=self.stream)

    # -- one message ---------------------------------------------------------------------

    async def handle_group(self, msgs: list) -> bool:
        """Apply delivered messages in order; contiguous, decodable ones in one transaction."""
        if len(msgs) == 1:
            m = msgs[0]
            return await self.handle(m.metadata.sequence.stream, m.data, m.headers, m.metadata.num_pending, m.subject)
        items: list[tuple[ChangeBatch, str, int]] = []
        expected = self.position + 1
        simple = True
        for m in msgs:
            seq = m.metadata.sequence.stream
            if seq < expected:
                continue  # duplicate delivery
            if seq != expected:
                simple = False  # a gap: the careful path handles truncation
                break
            if self.own_publishes is not None and self.own_publishes.take(self.stream, seq):
                items.append((ChangeBatch(origin=self.node_id, rows=()), self.stream, seq))
            else:
                try:
                    batch = await _decode(m.data)
                except codec.CodecError:
                    simple = False
                    break
                if self._forged(m.subject, batch) is not None:
                    simple = False  # the careful path dead-letters it
                    break
                if isinstance(batch, codec.Fragment):
                    simple = False  # a large row's piece: staged one by one (handle)
                    break
                items.append((batch, self.stream, seq))
            expected = seq + 1
        if simple and items:
            try:
                await self._apply_many_with_retry(items)
            except (DatabaseReplacedError, ConsumerStopping):
                raise
            except Exception:  # noqa: BLE001 - one bad batch: apply one by one to isolate it
                simple = False
            else:
                rows = sum(_row_count(batch) for batch, _, _ in items)
                self.position = items[-1][2]
                self._unsaved_own_seq = None
                self.metrics.inc("rows_applied", rows)
                self.metrics.inc("batches_applied", len(items))
                self._after_apply(msgs[-1].metadata.num_pending, rows)
                return False
        if not simple or not items:
            for m in msgs:
                if await self.handle(m.metadata.sequence.stream, m.data, m.headers, m.metadata.num_pending, m.subject):
                    return True
        return False

    async def _apply_many_with_retry(self, items: list[tuple[ChangeBatch, str, int]]) -> None:
        await self._until_database_accepts(f"seq {items[0][2]}..{items[-1][2]}", self._apply_timed, items)

    def _apply_timed(self, items: list) -> list:
        """On the database thread: one apply transaction, timed; once it committed, how long
        after its origin's commit each message's newest row became visible here (the version's
        clock is the origin's, so clock offset between the hosts adds to it; never below 0)."""
        started = time.perf_counter()
        outcomes = self.applier.apply_many(items)
        self.metrics.observe("apply_transaction_seconds", time.perf_counter() - started)
        now_ms = time.time() * 1000.0
        for outcome in outcomes:
            if outcome.max_version:  # 0: a duplicate, or our own rows, or nothing to apply
                self.metrics.observe("commit_to_visible_seconds", max(0.0, now_ms - (outcome.max_version >> 16)) / 1000.0)
        return outcomes

    async def _until_database_accepts(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """Run `call` on the database thread, retrying transient and environment errors for as
        long as they last, with backoff (at most BACKOFF_MAX_S between attempts).

        While the database cannot be written (disk full, I/O error, read-only; or locked for
        several attempts), the stream shows in status.apply_blocked (/health 503) and the gauge
        apply_blocked{stream} is 1; both clear on the next success. Any other error is raised
        for the caller to dead-letter. Raises ConsumerStopping if the node stops meanwhile.
        """
        attempt = 0
        while True:
            try:
                result = await self.db.run(call, *args)
            except DatabaseReplacedError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc):
                    self._unblock()
                    raise
                attempt += 1
                environment = is_environment(exc)
                self.metrics.inc("errors", kind="apply_environment" if environment else "apply_transient")
                if environment or attempt >= BLOCKED_AFTER_ATTEMPTS:
                    self._block(f"{what}: {type(exc).__name__}: {exc}")
                if attempt in (1, 10) or attempt % 50 == 0:
                    log.warning("stream %s %s: the database cannot take it now (%s); retrying", self.stream, what, exc)
                delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2)
                stop = self._stop or asyncio.Event()
                await _wait_for(stop, delay)
                if stop.is_set():
                    raise ConsumerStopping() from exc
                continue
            self._unblock()
            return result

    def _block(self, reason: str) -> None:
        if self.stream not in self.status.apply_blocked:
            log.error("stream %s: applying paused until the database can be written: %s", self.stream, reason)
        self.status.apply_blocked[self.stream] = reason
        self.metrics.set("apply_blocked", 1, stream=self.stream)

    def _unblock(self) -> None:
        if self.status.apply_blocked.pop(self.stream, None) is not None:
            log.warning("stream %s: the database accepts writes again; applying resumed", self.stream)
            self.metrics.set("apply_blocked", 0, stream=self.stream)

    async def handle(
        self, seq: int, payload: bytes, headers: dict | None, num_pending: int = 0, subject: str | None = None
    ) -> bool:
        """Apply one delivered message. True if the subscription must restart (after a restore).

        `subject` is the message's subject; None only for callers that checked it already."""
        if seq <= self.position:
            return False  # duplicate delivery (resubscribe overlap)
        if seq > self.position + 1:
            if await self._truncated(seq):
                return True
        if self.own_publishes is not None and self.own_publishes.take(self.stream, seq):
            # Published by this very process: the rows are ours already, only the position moves.
            self.position = seq
            self._unsaved_own_seq = seq
            if num_pending == 0 and time.monotonic() - self._own_position_saved_at >= OWN_POSITION_SAVE_S:
                await self._save_own_position()
            self._after_apply(num_pending, rows=0)
            return False
        try:
            batch = await _decode(payload)
        except codec.CodecError as exc:
            await self._dead_letter(seq, payload, f"undecodable message: {exc}")
            self._after_apply(num_pending, rows=0)
            return False
        forged = self._forged(subject, batch) if subject is not None else None
        if forged is not None:
            self.metrics.inc("forged_messages")
            await self._dead_letter(seq, payload, forged)
            self._after_apply(num_pending, rows=0)
            return False
        if isinstance(batch, codec.Fragment):
            return await self._handle_fragment(seq, payload, batch, num_pending)
        await self._apply_with_retry(batch, seq, payload)
        self._after_apply(num_pending, rows=_row_count(batch))
        return False

    def _forged(self, subject: str, batch) -> str | None:
        """Why a message cannot be trusted, or None. The servers let a node's identity publish
        only on its own token (`<shard subject>.<node id>`), so the origin in the body must be
        that token: anything else was published by someone else in that node's name."""
        try:
            token = origin_of_subject(subject, self.subject)
        except ValueError as exc:
            return f"forged origin: {exc}"
        if token is not None and token != batch.origin:
            return f"forged origin: body says node {batch.origin} but it was published on {subject}"
        return None

    async def _handle_fragment(self, seq: int, payload: bytes, fragment: codec.Fragment, num_pending: int) -> bool:
        """A piece of a row larger than one message (replication/fragments.py): staged with the
        position; the last one joins the pieces, and the row is applied like any batch."""
        outcome = await self._until_database_accepts(f"seq {seq}", self.applier.stage_fragment, self.stream, seq, fragment)
        if outcome.refused is not None:
            await self._dead_letter(seq, payload, f"large row: {outcome.refused}")
            self._after_apply(num_pending, rows=0)
            return False
        if outcome.body is None:
            self.position = seq
            self._unsaved_own_seq = None
            self._after_apply(num_pending, rows=0)
            return False
        rows = 0
        batch = None
        try:
            batch = await asyncio.to_thread(codec.decode_assembled, outcome.body)
        except codec.CodecError as exc:
            await self._dead_letter(seq, payload, f"undecodable large row (its last fragment kept): {exc}")
        else:
            if batch.origin != fragment.origin:  # the pieces' subject vouched for fragment.origin only
                self.metrics.inc("forged_messages")
                await self._dead_letter(seq, payload, f"forged origin: a large row from node {fragment.origin} "
                                                      f"says node {batch.origin}")
                batch = None
        if batch is not None:
            await self._apply_with_retry(batch, seq, payload)
            rows = _row_count(batch)
        # The pieces are no longer needed (a crash before this leaves them until the origin's
        # next large row on this stream starts over: its first fragment clears them).
        await self._until_database_accepts(f"seq {seq}", self.applier.clear_fragments, self.stream, fragment.origin)
        self._after_apply(num_pending, rows=rows)
        return False

    def _after_apply(self, num_pending: int, rows: int) -> None:
        if self.gap is not None:
            self._close_gap()
        self.status.applied[self.stream] = self.position
        self._set_lag(num_pending)
        if rows:
            self.status.last_apply = time.time()

    async def _apply_with_retry(self, batch: "ChangeBatch | codec.GroupedBatch", seq: int, payload: bytes) -> None:
        try:
            await self._until_database_accepts(f"seq {seq}", self._apply_timed, [(batch, self.stream, seq)])
        except (DatabaseReplacedError, ConsumerStopping):
            raise
        except Exception as exc:  # noqa: BLE001 - permanent: the message's fault, not the database's
            await self._dead_letter(seq, payload, f"apply failed: {type(exc).__name__}: {exc}")
            return
        self.position = seq
        self._unsaved_own_seq = None  # the applied position covers skipped own messages too
        self.metrics.inc("rows_applied", _row_count(batch))
        self.metrics.inc("batches_applied")

    async def _dead_letter(self, seq: int, payload: bytes, reason: str) -> None:
        log.error("stream %s seq %d: dead-lettered: %s", self.stream, seq, reason)
        while True:
            try:
                await self._until_database_accepts(f"dead letter for seq {seq}", self.applier.dead_letter,
                                                   self.stream, seq, payload, reason)
                break
            except (DatabaseReplacedError, ConsumerStopping):
                raise
            except Exception as exc:  # noqa: BLE001 - the dead letter itself must not be lost
                log.warning("stream %s seq %d: cannot record dead letter (%s); retrying", self.stream, seq, exc)
                self._block(f"dead letter for seq {seq}: {type(exc).__name__}: {exc}")
                stop = self._stop or asyncio.Event()
                await _wait_for(stop, BACKOFF_MAX_S)
                if stop.is_set():
                    raise ConsumerStopping() from exc
        self.position = seq
        self._unsaved_own_seq = None
        self.status.dead_letters += 1
        self.metrics.inc("dead_letters")
        kept = min(len(payload), MAX_KEPT_PAYLOAD_BYTES)
        self.metrics.inc("dead_letter_bytes", kept)
        if kept < len(payload):
            self.metrics.inc("dead_letters_truncated")

    async def _save_own_position(self) -> None:
        """Store the position reached by skipping own messages (an empty batch moves it)."""
        if self._unsaved_own_seq is None:
            return
        seq = self._unsaved_own_seq
        self._own_position_saved_at = time.monotonic()
        try:
            await self.db.run(self.applier.apply, ChangeBatch(origin=self.node_id, rows=()), self.stream, seq)
            if self._unsaved_own_seq == seq:
                self._unsaved_own_seq = None
        except Exception as exc:  # noqa: BLE001 - retried at the next idle moment; re-delivery is harmless
            log.debug("stream %s: position %d not stored yet (%s)", self.stream, seq, exc)

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

    async def _truncated(self, seq: int) -> bool:
        """Entries position+1 .. seq-1 are gone. Never applies past them: the consumer holds,
        either for the restore the runtime starts, or with an open gap; True (the subscription
        must restart). False only when they were all this process's own messages."""
        expected = self.position + 1
        if self.own_publishes is not None and self.own_publishes.take_range(self.stream, expected, seq - 1):
            # Retention dropped only what this process published itself: nothing is missing.
            self.position = self._unsaved_own_seq = seq - 1
            return False
        self.metrics.inc("errors", kind="log_truncated")
        decision = await self.on_truncated(self.stream, expected, seq) if self.on_truncated is not None else False
        if isinstance(decision, ResumeAfter) and expected - 1 <= decision.position < seq:
            await self._until_database_accepts(f"gap {expected}..{seq - 1}", self.applier.skip_gap,
                                               self.stream, decision.position)
            log.error("stream %s: entries %d..%d are gone; continuing from %d: %s",
                      self.stream, expected, seq - 1, decision.position + 1, decision.reason)
            self.position = decision.position
            self._unsaved_own_seq = None
            self.status.applied[self.stream] = self.position
            self._close_gap()
            return True
        if decision is True:
            # The runtime restores a snapshot: apply nothing until it restarts us from the
            # restored position (it stops every consumer first, see node/restore_coordinator.py).
            self.hold(f"entries {expected}..{seq - 1} are gone; waiting for a snapshot restore")
            self._gap_retry_at = float("inf")  # restart_from ends the wait
            return True
        self._open_gap(expected, seq - 1)
        return True

    def _open_gap(self, first: int, last: int) -> None:
        new = self.gap is None
        self.gap = (first, last)
        since = self.status.gaps.get(self.stream, {}).get("since") or time.time()
        self.status.gaps[self.stream] = {
            "missing_from": first, "missing_to": last, "missing": last - first + 1, "since": since,
        }
        self.metrics.set("stream_gap_entries", last - first + 1, stream=self.stream)
        if new:
            log.error(
                "stream %s: entries %d..%d were dropped by retention before this node applied them and no "
                "snapshot closes the gap yet; applying nothing more from this stream (position stays %d) "
                "until a snapshot is restored (see docs/replication.md, 'Gaps')",
                self.stream, first, last, self.position,
            )
        self.hold(f"entries {first}..{last} are gone and no snapshot closes the gap yet")
        self._gap_retry_at = time.monotonic() + GAP_RETRY_S

    def _close_gap(self) -> None:
        if self.gap is None:
            return
        log.info("stream %s: the gap %d..%d is closed (position %d)", self.stream, *self.gap, self.position)
        self.gap = None
        self.status.gaps.pop(self.stream, None)
        self.status.gap_recovery.pop(self.stream, None)
        self.metrics.set("stream_gap_entries", 0, stream=self.stream)

    async def _backoff(self, what: str, exc: BaseException, stop: asyncio.Event) -> None:
        self._failures += 1
        self.metrics.inc("errors", kind="consume")
        delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(self._failures, 10)) * (0.5 + random.random() / 2)
        level = logging.WARNING if self._failures <= 3 else logging.ERROR
        log.log(level, "%s: %s: %s; retrying in %.2fs", what, type(exc).__name__, exc, delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass


async def _wait_for(event: asyncio.Event, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except asyncio.TimeoutError:
        pass
