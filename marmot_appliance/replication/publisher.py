"""Publish captured rows to the shard streams: batched, pipelined, acknowledged, never skipped.

One round: read up to `read_limit` pending rows (commit order), group them per shard, cut each
shard's rows into batches bounded by rows and bytes, publish every batch with `publish_async`
(many acks in flight), wait for the acks, then mark the acknowledged rows published in one
SQLite transaction. Rows are marked only after a positive ack. If a batch fails, later batches of
the same shard are not marked either (a shard stream is the order replicas see for a row), the
round backs off exponentially (bounded) and the next round re-reads the still-pending rows in
order: nothing is skipped. A batch re-sent after a crash or failure carries the same
`Nats-Msg-Id` when it holds the same rows, so JetStream drops the duplicate; if the composition
differs, the re-sent rows carry their original versions and replicas ignore what they already
have.

Cutting rows into messages is batching.py's, sending them and reading their acks sending.py's,
and every byte on the wire the codec's (wire/); this module runs the rounds.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication import codec
from marmot_appliance.replication.batching import BatchBuilder, OutgoingBatch, mark_continuations
from marmot_appliance.replication.capture import PendingRows
from marmot_appliance.replication.own_publishes import OwnPublishes
from marmot_appliance.replication.sending import ACK_TIMEOUT_S, Sent, await_acks, send_batches
from marmot_appliance.replication.types import CommitSignal, PublishSource, PublishStatus, WorkerThread
from marmot_appliance.retry import backoff_delay, jittered, sleep_or_stop
from marmot_appliance.spec.model import ReplicationSettings

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 5.0
# Rounds read and sent whose acks (and retire) are still pending, at most. Under a trickle of
# single commits each round is one row, so this must be generous; the JetStream client's own
# publish_async window bounds the bytes in flight.
MAX_ROUNDS_IN_FLIGHT = 64

# A round for the retirer: number, the read, what was sent, why sending stopped, ack deadline.
Round = tuple[int, PendingRows, Sent, BaseException | None, float]


class Publisher:
    """Publishes a node's captured changes. `capture` runs on `db` (a DbThread)."""

    def __init__(
        self,
        js: JetStreamContext,
        capture: PublishSource,
        db: WorkerThread,
        node_id: int,
        replication: ReplicationSettings,
        max_payload: int,
        wakeup: CommitSignal,
        metrics: Metrics,
        status: PublishStatus,
        own_publishes: OwnPublishes | None = None,
        read_limit: int | None = None,
        retire_db: WorkerThread | None = None,
    ) -> None:
        self.js = js
        self.capture = capture
        self.db = db
        self.node_id = node_id
        self.replication = replication
        self.wakeup = wakeup
        self.metrics = metrics
        self.status = status
        self.builder = BatchBuilder(node_id, replication, max_payload)
        self.own_publishes = own_publishes
        self.read_limit = read_limit or max(1000, replication.batch.max_rows * 20)
        self._failures = 0
        self._last_round_rows = 0  # rows the last round read: decides whether to wait for more
        # Retires run here: the capture's own thread unless the caller gives a second one (then
        # the capture should have use_retire_connection() called, so both may run at once).
        self.retire_db = retire_db or db
        self._resync = False
        self._in_flight = 0

    def schema_changed(self) -> None:
        """Capture was re-installed (or the database restored): let the pipeline drain and
        re-read from the oldest pending row before sending more (each log row names its own
        layout, so there is no schema state to refresh)."""
        self._resync = True

    def reread_log(self) -> None:
        """Rows were logged below the read cursor (rows logged again keep their original version
        as log id, capture.relog_own_rows): drain, then read again from the oldest pending row.
        Without this they waited for the idle fallback, which a busy file never reaches."""
        self._resync = True

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set, then flush what is pending (bounded) and return.

        Pipelined: a round is read, encoded and sent while earlier rounds still wait for their
        acks; a separate task (_retire_rounds) awaits each round's acks in order and marks its
        rows published. The next read starts above the last id sent, so a commit goes out as
        soon as it is seen instead of after the previous round's ack and retire. Any failure
        stops sending: the pipeline drains (acknowledged rows before the failure are marked,
        as publish_round does), the publisher backs off, and the next read starts again from
        the oldest row still pending, in order: nothing is skipped.
        """
        delay_s = self.replication.batch.max_delay_ms / 1000.0
        fallback_s = self.replication.poll_interval_ms / 1000.0
        self._rounds: asyncio.Queue[Round] = asyncio.Queue()
        self._in_flight = 0  # rounds sent whose acks / retire are not done
        self._pipeline_failure: BaseException | None = None
        self._failed_round: int | None = None  # rounds after this one are re-sent, not marked
        self._next_round = 0
        self._round_done = asyncio.Event()
        retirer = asyncio.create_task(self._retire_rounds(), name="publish-retire")
        cursor = 0  # highest log id sent; rows above it are new
        more = True  # start with a round: rows may be pending from before a restart
        try:
            while not stop.is_set():
                if self._pipeline_failure is not None or self._resync:
                    await self._drain_pipeline()
                    failure, self._pipeline_failure = self._pipeline_failure, None
                    self._failed_round = None
                    cursor = 0
                    self._resync = False
                    if failure is not None:
                        await self._backoff(failure, stop)
                        more = True
                        continue
                    self._failures = 0
                if not more:
                    woke = await self._wait(stop, fallback_s)
                    if stop.is_set():
                        break
                    if woke and delay_s > 0 and self._last_round_rows >= self.builder.max_rows:
                        # A burst is under way: let more of it commit, for fuller batches. A lone
                        # commit goes out at once (waiting would only add latency: nothing to batch).
                        await asyncio.sleep(delay_s)
                    if not woke and self._in_flight == 0:
                        cursor = 0  # the slow safety net re-reads from the oldest pending row
                while self._in_flight >= MAX_ROUNDS_IN_FLIGHT and self._pipeline_failure is None:
                    self._round_done.clear()
                    await self._round_done.wait()
                if self._pipeline_failure is not None:
                    continue
                try:
                    read, batches = await self.db.run(self._read_and_build, cursor)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the database: back off, retry in order
                    self._fail(exc, self._next_round)
                    continue
                self._last_round_rows = len(read)
                if not read:
                    if self._in_flight == 0 and cursor == 0:
                        self.status.pending_rows = 0
                    more = False
                    continue
                cursor = max(cursor, read.rows[-1][0])
                sent, send_failure = await self._send_batches(batches)
                ack_deadline = time.monotonic() + ACK_TIMEOUT_S
                round_number = self._next_round
                self._next_round += 1
                self._in_flight += 1
                self._rounds.put_nowait((round_number, read, sent, send_failure, ack_deadline))
                if send_failure is not None:
                    self._fail(send_failure, round_number)
                more = len(read) >= self.read_limit
        finally:
            await self._drain_pipeline()
            retirer.cancel()
            try:
                await retirer
            except asyncio.CancelledError:
                pass
        await self.flush()

    def _fail(self, exc: BaseException, round_number: int) -> None:
        """Record the first failure; rounds after `round_number` will not be marked."""
        if self._pipeline_failure is None:
            self._pipeline_failure = exc
            self._failed_round = round_number

    async def _drain_pipeline(self) -> None:
        """Wait until every round sent has been acknowledged (or failed) and retired."""
        while self._in_flight > 0:
            self._round_done.clear()
            await self._round_done.wait()

    async def _retire_rounds(self) -> None:
        """Await each sent round's acks in order; mark its acknowledged rows published."""
        while True:
            round_number, read, sent, send_failure, ack_deadline = await self._rounds.get()
            taken = 1
            try:
                if self._failed_round is not None and round_number > self._failed_round:
                    # An earlier round failed: this one's rows are re-read and re-sent (same
                    # Nats-Msg-Id when the composition is the same), so mark nothing now and
                    # do not wait for its acks either.
                    self._abandon(sent)
                    continue
                acked_ids, failure = await self._collect_acks(sent, send_failure, ack_deadline)
                everything = failure is None and len(acked_ids) == len(read)
                if everything:
                    # Later rounds already fully acknowledged join this retire: one write
                    # transaction for all of them (retires compete with the application for
                    # the write lock; fewer is faster under a stream of small commits).
                    reads = [read]
                    while not self._rounds.empty():
                        next_number, next_read, next_sent, next_failure, _ = self._rounds._queue[0]  # type: ignore[attr-defined]  # a peek; Queue has none
                        if next_failure is not None or not all(f.done() for _, f in next_sent):
                            break
                        if self._failed_round is not None and next_number > self._failed_round:
                            break
                        next_acked, next_error = await self._collect_acks(next_sent, None)
                        self._rounds.get_nowait()
                        taken += 1
                        if next_error is not None or len(next_acked) != len(next_read):
                            # Not expected (all acks were in): mark what was acked, then stop.
                            if next_acked:
                                await self.retire_db.run(self.capture.mark_rows_published, next_read, next_acked)
                            failure = next_error or nats.errors.Error("incomplete acknowledgement")
                            self._fail(failure, next_number)
                            break
                        reads.append(next_read)
                    merged = reads[0] if len(reads) == 1 else PendingRows.merged(reads)
                    await self.retire_db.run(self.capture.mark_rows_published, merged, None)
                    self.status.last_publish = time.time()
                elif acked_ids:
                    try:
                        await self.retire_db.run(self.capture.mark_rows_published, read, acked_ids)
                    except Exception as exc:  # noqa: BLE001 - unmarked rows are simply re-sent
                        failure = failure or exc
                    else:
                        self.status.last_publish = time.time()
                if failure is not None:
                    self._fail(failure, round_number)
                elif self._pipeline_failure is None:
                    self._failures = 0
            except Exception as exc:  # noqa: BLE001 - never let the retirer die: the sender waits on it
                self._fail(exc, round_number)
            finally:
                self._in_flight -= taken
                self._round_done.set()

    @staticmethod
    def _abandon(sent: Sent) -> None:
        """Stop waiting for a round's acks (its rows stay pending and are sent again)."""
        for _, future in sent:
            future.cancel()

    async def _wait(self, stop: asyncio.Event, timeout_s: float) -> bool:
        stop_waiter = asyncio.ensure_future(stop.wait())
        wake_waiter = asyncio.ensure_future(self.wakeup.wait(timeout_s))
        try:
            await asyncio.wait({stop_waiter, wake_waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop_waiter, wake_waiter):
                task.cancel()
        return wake_waiter.done() and not wake_waiter.cancelled() and bool(wake_waiter.result())

    async def _backoff(self, exc: BaseException, stop: asyncio.Event) -> None:
        self._failures += 1
        kind = type(exc).__name__
        self.metrics.inc("errors", kind=f"publish_{kind}")
        delay = jittered(backoff_delay(self._failures, BACKOFF_INITIAL_S, BACKOFF_MAX_S, max_exponent=10))
        level = logging.WARNING if self._failures <= 3 else logging.ERROR
        log.log(level, "publish failed (%s: %s); retrying in %.2fs (attempt %d)", kind, exc, delay, self._failures)
        await sleep_or_stop(stop, delay)

    async def flush(self, timeout_s: float = 10.0) -> None:
        """Publish everything pending now (graceful shutdown). Gives up after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if not await self.publish_round():
                    return
            except Exception as exc:  # noqa: BLE001
                log.warning("flush at shutdown incomplete (%s); the rows stay pending for the next start", exc)
                return

    async def publish_round(self) -> bool:
        """Publish one read of pending rows. True if more rows may be waiting."""
        # Read and encode on the capture thread: the event loop stays free for acks.
        read, batches = await self.db.run(self._read_and_build)
        self._last_round_rows = len(read)
        if not read:
            self.status.pending_rows = 0
            return False
        acked_ids, failure = await self._publish_batches(batches)
        if acked_ids:
            everything = failure is None and len(acked_ids) == len(read)
            await self.retire_db.run(self.capture.mark_rows_published, read, None if everything else acked_ids)
            self.status.last_publish = time.time()
        if failure is not None:
            raise failure
        return len(read) >= self.read_limit

    def _read_and_build(self, after_id: int = 0) -> tuple[PendingRows, list[OutgoingBatch]]:
        read = self.capture.read_pending_rows(self.read_limit, after_id)
        return read, mark_continuations(self.builder.build_rows(read), len(read) >= self.read_limit)

    async def _publish_batches(self, batches: list[OutgoingBatch]) -> tuple[list[int], BaseException | None]:
        """Send all batches with acks in flight; return log ids safe to mark, and the first error."""
        sent, failure = await self._send_batches(batches)
        return await self._collect_acks(sent, failure)

    async def _send_batches(self, batches: list[OutgoingBatch]) -> tuple[Sent, BaseException | None]:
        return await send_batches(self.js, self.replication, self.node_id, self.metrics, batches)

    async def _dead_letter_oversized(self, oversized: list[OutgoingBatch]) -> None:
        """Rows too large to replicate: recorded in this node's dead-letter table, counted."""
        for outgoing in oversized:
            log.error("not replicated: %s; recorded in the dead-letter table", outgoing.oversized)
            stream = self.replication.stream_name(outgoing.shard)
            await self.retire_db.run(self.capture.record_dead_letter, stream, outgoing.oversized)
            self.metrics.inc("rows_oversized", len(outgoing.log_ids))
            self.metrics.inc("dead_letters")  # one entry in the dead-letter table

    async def _collect_acks(
        self,
        in_flight: Sent,
        failure: BaseException | None,
        ack_deadline: float | None = None,
    ) -> tuple[list[int], BaseException | None]:
        """Wait for the acks of sent batches; log ids safe to mark, and the first error.

        `ack_deadline` (monotonic) counts from when the round was sent, not from now: rounds
        are collected one after the other, so a fresh timeout per round would make a lost
        stream leader cost ACK_TIMEOUT_S per round in flight (minutes under a trickle of
        single-row commits) instead of ACK_TIMEOUT_S once.
        """
        acks = await await_acks(in_flight, failure, ack_deadline)
        acked, oversized, failure = acks.acked, acks.oversized, acks.failure
        if self.own_publishes is not None:
            for _outgoing, ack in acks.published:
                self.own_publishes.add(ack.stream, ack.seq)
        if oversized:
            try:
                await self._dead_letter_oversized(oversized)
            except Exception as exc:  # noqa: BLE001 - not retired now: re-read and retried next round
                oversized_ids = {log_id for outgoing in oversized for log_id in outgoing.log_ids}
                acked = [log_id for log_id in acked if log_id not in oversized_ids]
                failure = failure or exc
        rows = sum(len(outgoing.log_ids) for outgoing, _ack in acks.published)
        if rows:  # (a round of only leading fragments of a large row counts with its last one)
            payloads = [outgoing.payload for outgoing, _ack in acks.published]
            self.metrics.inc("rows_published", rows)
            self.metrics.inc("batches_published", len(payloads))
            self.metrics.inc("bytes_compressed", sum(map(len, payloads)))
            self.metrics.inc("bytes_uncompressed", sum(map(codec.uncompressed_size, payloads)))
        return acked, failure
