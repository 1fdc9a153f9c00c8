"""What a shard consumer does with each delivered message (replication/consumer.py has the whole
story): apply it at the stream position, skip this process's own, dead-letter what cannot be
applied, stage a large row's fragments, and hold at a gap in the stream.

ShardMessages keeps one stream's position and applies messages there; ShardConsumer
(replication/consumer.py) adds the subscription that delivers them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from nats.aio.msg import Msg

from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication import codec
from marmot_appliance.replication.applier import ApplyOutcome, BatchApplier, DatabaseReplacedError
from marmot_appliance.replication.consumer_errors import ConsumerStopping
from marmot_appliance.replication.consumer_retry import BACKOFF_MAX_S, DatabaseRetry
from marmot_appliance.replication.db_thread import DbThread
from marmot_appliance.replication.own_publishes import OwnPublishes
from marmot_appliance.replication.payload_bounds import MAX_KEPT_PAYLOAD_BYTES
from marmot_appliance.replication.streams import origin_of_subject
from marmot_appliance.replication.types import ChangeBatch, ConsumerStatus
from marmot_appliance.retry import sleep_or_stop

# The consumer's logger: what an operator filters on stays one name across its modules.
log = logging.getLogger("marmot_appliance.replication.consumer")

# Own messages skipped while caught up store their position at most this often (and on every
# idle check and at shutdown): storing it per message cost the publishing node one write
# transaction per message, competing with the application for the write lock and waking its
# own publisher for an empty read. A position stored late only means a few own messages are
# delivered and skipped again after a crash.
OWN_POSITION_SAVE_S = 0.5
# A gap no snapshot closes yet is looked at again this often (resubscribe: the gap is found
# again, and on_truncated checks for a snapshot that covers it now).
GAP_RETRY_S = 5.0

ApplyItem = tuple["ChangeBatch | codec.GroupedBatch", str, int]  # (batch, stream, seq)


@dataclass(frozen=True)
class ResumeAfter:
    """`on_truncated`'s answer when the gap no longer needs its entries: every row they carried
    was published again after `position` (node/gap_closer.py). The consumer stores `position`
    and continues from the next entry."""

    position: int
    reason: str


TruncationHandler = Callable[[str, int, int], Awaitable["bool | ResumeAfter"]]


def _row_count(batch: ChangeBatch | codec.GroupedBatch) -> int:
    if isinstance(batch, codec.GroupedBatch):
        return batch.row_count
    return len(batch.rows)


async def _decode(payload: bytes) -> ChangeBatch | codec.GroupedBatch | codec.Fragment:
    """Decode off the event loop: a large body takes milliseconds, and the loop serves NATS
    heartbeats and /health meanwhile. Every failure is a CodecError (the codec bounds size,
    item count and nesting before it builds anything). A large row's piece is a Fragment."""
    return await asyncio.to_thread(codec.decode_for_apply, payload)


class ShardMessages:
    """One shard stream's applied position, and the messages applied at it."""

    def __init__(
        self,
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
    ):
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
        self.holding: str | None = None  # why this consumer applies nothing until restart_from
        self.gap: tuple[int, int] | None = None  # (first, last) entry gone before we applied it
        self._gap_retry_at = 0.0  # time.monotonic() when a held gap is looked at again
        self._unsaved_own_seq: int | None = None  # own messages skipped, position not yet stored
        self._own_position_saved_at = 0.0  # time.monotonic() of the last _save_own_position
        self._retry = DatabaseRetry(stream, db, metrics, status)
        self.status.applied[stream] = start_position

    def hold(self, reason: str) -> None:
        """Apply nothing more until `restart_from` (the runtime is replacing the database)."""
        if self.holding is None:
            log.warning("stream %s: holding at position %d: %s", self.stream, self.position, reason)
        self.holding = reason
        self._unsaved_own_seq = None  # an own-message position must not land in the new file

    def _set_lag(self, behind: int) -> None:
        self.status.lag[self.stream] = behind
        self.metrics.set("stream_lag", behind, stream=self.stream)

    # -- delivered messages ----------------------------------------------------------------

    async def handle_group(self, msgs: list[Msg]) -> bool:
        """Apply delivered messages in order; contiguous, decodable ones in one transaction."""
        if len(msgs) == 1:
            m = msgs[0]
            return await self.handle(m.metadata.sequence.stream, m.data, m.headers, m.metadata.num_pending, m.subject)
        items: list[ApplyItem] = []
        expected = self.position + 1
        simple = True
        all_own = True  # every item this process's own publish: nothing to apply, only the position moves
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
                all_own = False
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
        if simple and items and all_own:
            # As handle() does for one own message: no write transaction, the position is
            # stored at the next idle moment (OWN_POSITION_SAVE_S) or with the next applied batch.
            await self._skip_own(items[-1][2], msgs[-1].metadata.num_pending)
            return False
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

    async def _apply_many_with_retry(self, items: list[ApplyItem]) -> None:
        await self._retry.until_accepts(f"seq {items[0][2]}..{items[-1][2]}", self._apply_timed, items)

    def _apply_timed(self, items: list[ApplyItem]) -> list[ApplyOutcome]:
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

    async def handle(
        self, seq: int, payload: bytes, headers: dict[str, str] | None, num_pending: int = 0,
        subject: str | None = None,
    ) -> bool:
        """Apply one delivered message. True if the subscription must restart (after a restore).

        `subject` is the message's subject; None only for callers that checked it already."""
        if seq <= self.position:
            return False  # duplicate delivery (resubscribe overlap)
        if seq > self.position + 1:
            if await self._truncated(seq):
                return True
        if self.own_publishes is not None and self.own_publishes.take(self.stream, seq):
            await self._skip_own(seq, num_pending)
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

    def _forged(self, subject: str, batch: ChangeBatch | codec.GroupedBatch | codec.Fragment) -> str | None:
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
        outcome = await self._retry.until_accepts(f"seq {seq}", self.applier.stage_fragment, self.stream, seq, fragment)
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
        batch: ChangeBatch | codec.GroupedBatch | None = None
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
        await self._retry.until_accepts(f"seq {seq}", self.applier.clear_fragments, self.stream, fragment.origin)
        self._after_apply(num_pending, rows=rows)
        return False

    def _after_apply(self, num_pending: int, rows: int) -> None:
        if self.gap is not None:
            self._close_gap()
        self.status.applied[self.stream] = self.position
        self._set_lag(num_pending)
        if rows:
            self.status.last_apply = time.time()

    async def _apply_with_retry(self, batch: ChangeBatch | codec.GroupedBatch, seq: int, payload: bytes) -> None:
        try:
            await self._retry.until_accepts(f"seq {seq}", self._apply_timed, [(batch, self.stream, seq)])
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
                await self._retry.until_accepts(f"dead letter for seq {seq}", self.applier.dead_letter,
                                                self.stream, seq, payload, reason)
                break
            except (DatabaseReplacedError, ConsumerStopping):
                raise
            except Exception as exc:  # noqa: BLE001 - the dead letter itself must not be lost
                log.warning("stream %s seq %d: cannot record dead letter (%s); retrying", self.stream, seq, exc)
                self._retry.block(f"dead letter for seq {seq}: {type(exc).__name__}: {exc}")
                if await sleep_or_stop(self._retry.stop, BACKOFF_MAX_S):
                    raise ConsumerStopping() from exc
        self.position = seq
        self._unsaved_own_seq = None
        self.status.dead_letters += 1
        self.metrics.inc("dead_letters")
        kept = min(len(payload), MAX_KEPT_PAYLOAD_BYTES)
        self.metrics.inc("dead_letter_bytes", kept)
        if kept < len(payload):
            self.metrics.inc("dead_letters_truncated")

    async def _skip_own(self, seq: int, num_pending: int) -> None:
        """Messages up to `seq` were published by this very process: the rows are ours already,
        only the position moves (stored when the stream is drained, at most every
        OWN_POSITION_SAVE_S, or by the next applied batch's transaction)."""
        self.position = seq
        self._unsaved_own_seq = seq
        if num_pending == 0 and time.monotonic() - self._own_position_saved_at >= OWN_POSITION_SAVE_S:
            await self._save_own_position()
        self._after_apply(num_pending, rows=0)

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

    # -- gaps --------------------------------------------------------------------------------

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
            await self._retry.until_accepts(f"gap {expected}..{seq - 1}", self.applier.skip_gap,
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
