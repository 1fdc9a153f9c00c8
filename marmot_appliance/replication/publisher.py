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
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from marmot_appliance.natsd.permissions import origin_subject
from marmot_appliance.observability.ack_timer import RoundAckTimer
from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication import codec
from marmot_appliance.replication.capture import PendingRows
from marmot_appliance.replication.sharding import shard_for
from marmot_appliance.replication.types import ChangeBatch, RowChange
from marmot_appliance.spec.model import ReplicationSettings

log = logging.getLogger(__name__)

# Room left under the server's max_payload for headers and protocol framing.
PAYLOAD_HEADROOM = 4096
ACK_TIMEOUT_S = 10.0
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 5.0
# Rounds read and sent whose acks (and retire) are still pending, at most. Under a trickle of
# single commits each round is one row, so this must be generous; the JetStream client's own
# publish_async window bounds the bytes in flight.
MAX_ROUNDS_IN_FLIGHT = 64


@dataclass(frozen=True)
class OutgoingBatch:
    shard: int
    log_ids: tuple[int, ...]
    batch: ChangeBatch | None  # None when encoded straight from raw log rows (build_rows)
    payload: bytes
    msg_id: str
    more: bool = False  # more rows of the same read follow on this shard (MORE_HEADER)
    # Why this row cannot be sent at all (beyond codec.MAX_ROW_BODY_BYTES): never published,
    # dead-lettered on this node and retired so that later rows flow.
    oversized: str = ""


def mark_continuations(batches: list[OutgoingBatch], read_was_cut: bool) -> list[OutgoingBatch]:
    """Flag every batch but the last of its shard: a receiver applies the run together.

    One read of the log holds whole committed transactions unless it stopped at its row limit
    (`read_was_cut`); then the last batch of each shard is flagged too and the run continues
    into the next read. Batches arrive grouped by shard (build / build_rows sort them).
    """
    flagged = []
    for index, outgoing in enumerate(batches):
        last_of_shard = index + 1 == len(batches) or batches[index + 1].shard != outgoing.shard
        more = read_was_cut or not last_of_shard
        flagged.append(replace(outgoing, more=True) if more else outgoing)
    return flagged


def estimate_row_bytes(change: RowChange) -> int:
    """A cheap upper-bound-ish size of a row on the wire, to cut batches before encoding."""
    size = 16 + len(change.table)
    for value in change.values:
        if isinstance(value, (str, bytes)):
            size += len(value) + 5
        else:
            size += 9
    return size


def message_id(node_id: int, log_ids: Sequence[int], payload: bytes) -> str:
    """Deterministic for the same rows: node, first and last log id, and a payload digest.

    The digest keeps two different batches from ever sharing an id (log ids can restart after
    the log table was emptied), while a retry of identical rows yields an identical id.
    """
    digest = hashlib.blake2b(payload, digest_size=8).hexdigest()
    return f"{node_id}-{log_ids[0]}-{log_ids[-1]}-{digest}"


_FIRST = itemgetter(0)
_LAYOUT_AND_OP = itemgetter(1, 2)
_NUMERIC = frozenset((int, float, type(None)))


def _tuple_getter(indexes: list[int]):
    """A getter returning a tuple of the given positions (a slice when they are consecutive)."""
    if indexes == list(range(indexes[0], indexes[0] + len(indexes))):
        return itemgetter(slice(indexes[0], indexes[0] + len(indexes)))
    return itemgetter(*indexes)


def _estimate_row_tuple_bytes(row: tuple) -> int:
    """estimate_row_bytes for a raw log row (id, layout, op, values...)."""
    size = 16
    for value in row[3:]:
        if isinstance(value, (str, bytes)):
            size += len(value) + 5
        else:
            size += 9
    return size


def _estimate_chunk_bytes(chunk: list[tuple]) -> int:
    """Roughly the encoded size of raw log rows, column by column (map/sum run in C)."""
    total = 16 * len(chunk)
    for position, column in enumerate(zip(*chunk)):
        if position < 3:
            continue
        kinds = set(map(type, column))
        if kinds <= _NUMERIC:
            total += 9 * len(column)
        elif kinds == {str} or kinds == {bytes}:
            total += sum(map(len, column)) + 5 * len(column)
        else:
            total += sum(len(v) + 5 if isinstance(v, (str, bytes)) else 9 for v in column)
    return total


class BatchBuilder:
    """Turns pending rows into encoded per-shard batches within the configured limits."""

    def __init__(
        self,
        node_id: int,
        replication: ReplicationSettings,
        max_payload: int,
        fingerprints: dict[str, str] | None = None,
        primary_keys: dict[str, tuple[str, ...]] | None = None,
    ):
        self.node_id = node_id
        self.replication = replication
        self.max_payload = max(1024, max_payload - PAYLOAD_HEADROOM)
        self.max_bytes = min(replication.batch.max_bytes, self.max_payload)
        self.max_rows = max(1, replication.batch.max_rows)
        self.fingerprints = fingerprints or {}
        self.primary_keys = primary_keys or {}

    def _too_large(self, payload: bytes) -> bool:
        """Whether an encoded batch exceeds what the server accepts in one message."""
        return len(payload) > self.max_payload

    def _large_row(self, shard: int, log_ids: tuple[int, ...], body: dict, table: str) -> list[OutgoingBatch]:
        """One row too large for a message: its fragments, flagged as one run (mark_continuations).

        Only the last fragment carries the row's log id, so the row is marked published only
        once every fragment was acknowledged (a shard's batches after a failed one are never
        marked). A row beyond codec.MAX_ROW_BODY_BYTES cannot travel at all: it comes back as
        an `oversized` batch that is never sent, which the publisher dead-letters on this node
        and retires, so the rows after it flow on.
        """
        try:
            payloads = codec.fragment_payloads(body, self.max_payload - codec.FRAGMENT_OVERHEAD,
                                               self.replication.compression)
        except codec.CodecError as exc:
            reason = f"a change of table {table!r} (log id {log_ids[0]}) cannot be replicated: {exc}"
            return [OutgoingBatch(shard, log_ids, None, b"", f"{self.node_id}-{log_ids[0]}-oversized", oversized=reason)]
        row_id = message_id(self.node_id, log_ids, payloads[0] + payloads[-1])
        count = len(payloads)
        return [
            OutgoingBatch(shard, log_ids if index == count - 1 else (), None, payload, f"{row_id}-{index + 1}of{count}")
            for index, payload in enumerate(payloads)
        ]

    def build(self, pending: Sequence[Any]) -> list[OutgoingBatch]:
        """`pending` holds PendingChange(log_id, change) in commit order."""
        shards = self.replication.shards
        per_shard: dict[int, list[Any]] = {}
        for item in pending:
            change = item.change
            shard = shard_for(change.table, change.pk, shards)
            per_shard.setdefault(shard, []).append(item)
        batches: list[OutgoingBatch] = []
        for shard in sorted(per_shard):
            chunk: list[Any] = []
            chunk_bytes = 0
            for item in per_shard[shard]:
                size = estimate_row_bytes(item.change)
                if chunk and (len(chunk) >= self.max_rows or chunk_bytes + size > self.max_bytes):
                    batches.extend(self._encode(shard, chunk))
                    chunk, chunk_bytes = [], 0
                chunk.append(item)
                chunk_bytes += size
            if chunk:
                batches.extend(self._encode(shard, chunk))
        return batches

    def _encode(self, shard: int, items: list[Any]) -> list[OutgoingBatch]:
        rows = tuple(item.change for item in items)
        tables = {row.table for row in rows}
        # The layout each row was captured with (rows outlive schema changes in the log).
        fingerprints = {t: self.fingerprints[t] for t in tables if t in self.fingerprints}
        for item in items:
            captured_with = getattr(item, "fingerprint", "")
            if captured_with:
                fingerprints[item.change.table] = captured_with
        batch = ChangeBatch(
            origin=self.node_id,
            rows=rows,
            fingerprints=fingerprints,
            primary_keys={t: tuple(self.primary_keys[t]) for t in tables if t in self.primary_keys},
        )
        # CBOR items at most: per row its array, group, version, values array, values, origin
        # and a pk array; per table and group their names. Receivers refuse more than MAX_CBOR_ITEMS.
        cbor_items = sum(len(row.values) + len(row.pk) + 7 for row in rows)
        cbor_items += sum(2 * len(columns) + 16 for columns in {row.columns for row in rows})
        if len(items) > 1 and cbor_items > codec.MAX_CBOR_ITEMS:
            middle = len(items) // 2
            return self._encode(shard, items[:middle]) + self._encode(shard, items[middle:])
        payload = codec.encode_batch(batch, self.replication.compression)
        log_ids = tuple(item.log_id for item in items)
        if self._too_large(payload):
            if len(items) == 1:
                return self._large_row(shard, log_ids, codec.body_map(batch), rows[0].table)
            middle = len(items) // 2  # the estimate was off (incompressible data): split and retry
            return self._encode(shard, items[:middle]) + self._encode(shard, items[middle:])
        return [OutgoingBatch(shard, log_ids, batch, payload, message_id(self.node_id, log_ids, payload))]

    # -- the fast path: raw log rows (capture.read_pending_rows) ---------------------------------

    def build_rows(self, read: PendingRows) -> list[OutgoingBatch]:
        """Encoded per-shard batches straight from raw log rows: no per-row objects.

        Produces the same wire format (and, for the same rows, the same bytes) as build() on
        the equivalent PendingChange list, with each table's layout taken from the layout the
        rows were captured with.
        """
        rows = read.rows
        if not rows:
            return []
        shards = self.replication.shards
        if shards == 1:
            per_shard = {1: rows}
        else:
            per_shard = {}
            layouts = read.layouts
            for row in rows:
                layout = layouts[row[1]]
                pk = tuple([row[3 + i] for i in layout.pk_indexes])
                per_shard.setdefault(shard_for(layout.table, pk, shards), []).append(row)
        batches: list[OutgoingBatch] = []
        max_rows = self.max_rows
        for shard in sorted(per_shard):
            shard_rows = per_shard[shard]
            start = 0
            while start < len(shard_rows):
                chunk = shard_rows[start : start + max_rows]
                if len(chunk) > 1 and _estimate_chunk_bytes(chunk) > self.max_bytes:
                    chunk = chunk[: self._rows_within_bytes(chunk)]
                batches.extend(self._encode_rows(shard, chunk, read.layouts))
                start += len(chunk)
        return batches

    def _rows_within_bytes(self, chunk: list[tuple]) -> int:
        """How many leading rows fit max_bytes (at least one). Only for chunks of large rows."""
        total = 0
        for count, row in enumerate(chunk):
            size = _estimate_row_tuple_bytes(row)
            if count and total + size > self.max_bytes:
                return count
            total += size
        return len(chunk)

    def _encode_rows(self, shard: int, chunk: list[tuple], layouts: dict) -> list[OutgoingBatch]:
        tables: list[list[Any]] = []
        table_slot: dict[str, int] = {}
        groups: list[list[Any]] = []
        slots: dict[tuple[int, int], tuple[int, Any]] = {}  # (layout id, op) -> (group, values getter)
        for layout_id, op in dict.fromkeys(map(_LAYOUT_AND_OP, chunk)):  # first-appearance order
            layout = layouts[layout_id]
            index = table_slot.get(layout.table)
            if index is None:
                index = table_slot[layout.table] = len(tables)
                tables.append([layout.table, layout.fingerprint, list(layout.primary_key)])
            else:
                tables[index][1] = layout.fingerprint  # the last layout's, as build() does
            if op == bk.OP_UPSERT:
                groups.append([index, "upsert", list(layout.columns), list(layout.pk_indexes)])
                getter = itemgetter(slice(3, 3 + len(layout.columns)))
            else:
                groups.append([index, "delete", list(layout.primary_key), list(range(len(layout.primary_key)))])
                getter = _tuple_getter([3 + i for i in layout.pk_indexes])
            slots[(layout_id, op)] = (len(groups) - 1, getter)
        if len(slots) == 1:
            ((group, getter),) = slots.values()
            entries = [(group, row[0], getter(row)) for row in chunk]
        else:
            entries = []
            append = entries.append
            for row in chunk:
                group, getter = slots[row[1], row[2]]
                append((group, row[0], getter(row)))
        body = {"o": self.node_id, "t": tables, "g": groups, "r": entries}
        # CBOR items: per row its array, group, version, values array and values (len(row) - 3
        # + 4); per group and table their names. Receivers refuse a body above MAX_CBOR_ITEMS.
        items = sum(map(len, chunk)) + len(chunk) + sum(2 * len(g[2]) + 16 for g in groups) + 16
        if len(chunk) > 1 and items > codec.MAX_CBOR_ITEMS:
            middle = len(chunk) // 2
            return self._encode_rows(shard, chunk[:middle], layouts) + self._encode_rows(shard, chunk[middle:], layouts)
        payload = codec.encode_body(body, self.replication.compression)
        log_ids = tuple(map(_FIRST, chunk))
        if self._too_large(payload):
            if len(chunk) == 1:
                return self._large_row(shard, log_ids, body, layouts[chunk[0][1]].table)
            middle = len(chunk) // 2  # the estimate was off (incompressible data): split and retry
            return self._encode_rows(shard, chunk[:middle], layouts) + self._encode_rows(shard, chunk[middle:], layouts)
        return [OutgoingBatch(shard, log_ids, None, payload, message_id(self.node_id, log_ids, payload))]


class OwnPublishes:
    """Stream sequences this process published and JetStream acknowledged.

    The consumer of the same node can skip exactly these (their rows are already in the local
    database) without decoding them. Messages of our origin from an earlier lifetime are applied
    normally: after a snapshot restore they may hold rows the database no longer has.
    """

    # Bounded: a consumer that stopped (a gap, a blocked database) or jumped past them (a
    # restore) never takes its own sequences. Past the cap the lowest half is forgotten; a
    # forgotten one is merely decoded and applied like any message (its versions are already
    # recorded here, so it changes nothing), never lost.
    MAX_PER_STREAM = 65_536

    def __init__(self, max_per_stream: int = MAX_PER_STREAM) -> None:
        self._seqs: dict[str, set[int]] = {}
        self.max_per_stream = max_per_stream

    def add(self, stream: str, seq: int) -> None:
        seqs = self._seqs.setdefault(stream, set())
        seqs.add(seq)
        if len(seqs) > self.max_per_stream:
            self._seqs[stream] = set(sorted(seqs)[len(seqs) - self.max_per_stream // 2:])

    def tracked(self) -> int:
        return sum(len(seqs) for seqs in self._seqs.values())

    def take(self, stream: str, seq: int) -> bool:
        """True (and forget it) if `seq` on `stream` was published by this process."""
        seqs = self._seqs.get(stream)
        if not seqs or seq not in seqs:
            return False
        seqs.discard(seq)
        return True

    def take_range(self, stream: str, first: int, last: int) -> bool:
        """True (and forget them) if every sequence first..last was published by this process:
        a "gap" of only our own messages is no gap (their rows are in the database)."""
        seqs = self._seqs.get(stream)
        if not seqs or last - first + 1 > len(seqs) or any(s not in seqs for s in range(first, last + 1)):
            return False
        seqs.difference_update(range(first, last + 1))
        return True

    def forget_below(self, stream: str, seq: int) -> None:
        seqs = self._seqs.get(stream)
        if seqs:
            self._seqs[stream] = {s for s in seqs if s >= seq}


class Publisher:
    """Publishes a node's captured changes. `capture` runs on `db` (a DbThread)."""

    def __init__(
        self,
        js: JetStreamContext,
        capture: Any,
        db: Any,
        node_id: int,
        replication: ReplicationSettings,
        max_payload: int,
        wakeup: Any,
        metrics: Metrics,
        status: Any,
        own_publishes: "OwnPublishes | None" = None,
        read_limit: int | None = None,
        retire_db: Any = None,
    ):
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
        self._schema_refresh_needed = True
        self._last_round_rows = 0  # rows the last round read: decides whether to wait for more
        # Retires run here: the capture's own thread unless the caller gives a second one (then
        # the capture should have use_retire_connection() called, so both may run at once).
        self.retire_db = retire_db or db
        self._resync = False
        self._in_flight = 0

    def schema_changed(self) -> None:
        """Capture was re-installed (or the database restored): refresh fingerprints, and let
        the pipeline drain and re-read from the oldest pending row before sending more."""
        self._schema_refresh_needed = True
        self._resync = True

    def reread_log(self) -> None:
        """Rows were logged below the read cursor (rows logged again keep their original version
        as log id, capture.relog_own_rows): drain, then read again from the oldest pending row.
        Without this they waited for the idle fallback, which a busy file never reaches."""
        self._resync = True

    async def _refresh_schema(self) -> None:
        self.builder.fingerprints = await self.db.run(self.capture.fingerprints)
        self.builder.primary_keys = await self.db.run(self.capture.primary_keys)
        self._schema_refresh_needed = False

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
        self._rounds: asyncio.Queue = asyncio.Queue()
        self._in_flight = 0  # rounds sent whose acks / retire are not done
        self._pipeline_failure = None
        self._failed_round = None  # rounds after this one are re-sent, not marked
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
                    if self._schema_refresh_needed:
                        await self._refresh_schema()
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
                        next_number, next_read, next_sent, next_failure, _ = self._rounds._queue[0]
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
    def _abandon(sent: list[tuple[OutgoingBatch, asyncio.Future]]) -> None:
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
        delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(self._failures, 10))
        delay *= 0.5 + random.random() / 2  # jitter: nodes recovering together do not stampede
        level = logging.WARNING if self._failures <= 3 else logging.ERROR
        log.log(level, "publish failed (%s: %s); retrying in %.2fs (attempt %d)", kind, exc, delay, self._failures)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass

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
        if self._schema_refresh_needed:
            await self._refresh_schema()
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

    async def _send_batches(
        self, batches: list[OutgoingBatch]
    ) -> tuple[list[tuple[OutgoingBatch, asyncio.Future]], BaseException | None]:
        """publish_async every batch in order; stop at the first that cannot be sent."""
        in_flight: list[tuple[OutgoingBatch, asyncio.Future]] = []
        failure: BaseException | None = None
        started = time.monotonic()
        for outgoing in batches:
            if outgoing.oversized:  # never sent: "acknowledged" at once, dead-lettered when retired
                done = asyncio.get_running_loop().create_future()
                done.set_result(None)
                in_flight.append((outgoing, done))
                continue
            headers = {codec.MSG_ID_HEADER: outgoing.msg_id, codec.ORIGIN_HEADER: str(self.node_id)}
            if outgoing.more:
                headers[codec.MORE_HEADER] = "1"
            try:
                future = await self.js.publish_async(
                    # Our own origin token: the only subject our identity may publish on.
                    origin_subject(self.replication, outgoing.shard, self.node_id),
                    outgoing.payload,
                    wait_stall=ACK_TIMEOUT_S,
                    stream=self.replication.stream_name(outgoing.shard),
                    headers=headers,
                )
            except Exception as exc:  # noqa: BLE001 - stop sending; what is in flight still counts
                failure = exc
                break
            in_flight.append((outgoing, future))
        if failure is None:
            RoundAckTimer(self.metrics, started, [future for outgoing, future in in_flight if not outgoing.oversized])
        return in_flight, failure

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
        in_flight: list[tuple[OutgoingBatch, asyncio.Future]],
        failure: BaseException | None,
        ack_deadline: float | None = None,
    ) -> tuple[list[int], BaseException | None]:
        """Wait for the acks of sent batches; log ids safe to mark, and the first error.

        `ack_deadline` (monotonic) counts from when the round was sent, not from now: rounds
        are collected one after the other, so a fresh timeout per round would make a lost
        stream leader cost ACK_TIMEOUT_S per round in flight (minutes under a trickle of
        single-row commits) instead of ACK_TIMEOUT_S once.
        """
        if in_flight:
            timeout_s = ACK_TIMEOUT_S if ack_deadline is None else max(0.0, ack_deadline - time.monotonic())
            done, not_done = await asyncio.wait([f for _, f in in_flight], timeout=timeout_s)
            for future in not_done:
                future.cancel()
            if not_done and failure is None:
                failure = nats.errors.TimeoutError()
        acked: list[int] = []
        oversized: list[OutgoingBatch] = []
        blocked_shards: set[int] = set()
        rows = batches_count = raw_bytes = plain_bytes = 0
        for outgoing, future in in_flight:
            ok = future.done() and not future.cancelled() and future.exception() is None
            if not ok:
                blocked_shards.add(outgoing.shard)
                if failure is None and future.done() and not future.cancelled():
                    failure = future.exception()
                continue
            if outgoing.shard in blocked_shards:
                continue  # keep a shard's rows in order: nothing after a failed batch is marked
            acked.extend(outgoing.log_ids)
            if outgoing.oversized:
                oversized.append(outgoing)
                continue
            if self.own_publishes is not None:
                ack = future.result()
                self.own_publishes.add(ack.stream, ack.seq)
            rows += len(outgoing.log_ids)
            batches_count += 1
            raw_bytes += len(outgoing.payload)
            plain_bytes += codec.uncompressed_size(outgoing.payload)
        if oversized:
            try:
                await self._dead_letter_oversized(oversized)
            except Exception as exc:  # noqa: BLE001 - not retired now: re-read and retried next round
                oversized_ids = {log_id for outgoing in oversized for log_id in outgoing.log_ids}
                acked = [log_id for log_id in acked if log_id not in oversized_ids]
                failure = failure or exc
        # Batches never sent (publish_async raised) are simply not marked.
        if rows:
            self.metrics.inc("rows_published", rows)
            self.metrics.inc("batches_published", batches_count)
            self.metrics.inc("bytes_compressed", raw_bytes)
            self.metrics.inc("bytes_uncompressed", plain_bytes)
        return acked, failure
