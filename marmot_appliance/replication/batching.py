"""How a publisher's read of log rows is cut into messages: per shard, bounded, in order.

Policy only; every byte is written by the codec (replication/wire/encode.py). One read is
grouped per shard (rows keep commit order within a shard), each shard's rows cut into chunks of
at most `batch.max_rows` rows and about `batch.max_bytes` (estimated before encoding), and a
chunk is halved again when its CBOR would hold more items than receivers accept
(MAX_CBOR_ITEMS) or its message exceeds the server's max_payload. A single row too large for
one message travels as fragments; one beyond MAX_ROW_BODY_BYTES is never sent (`oversized`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Any

from marmot_appliance.replication import codec
from marmot_appliance.replication.change_log import LogLayout, PendingRows
from marmot_appliance.replication.sharding import shard_for
from marmot_appliance.replication.types import ChangeBatch
from marmot_appliance.replication.wire.encode import BodyMap, LogRow
from marmot_appliance.spec.model import ReplicationSettings

# Room left under the server's max_payload for headers and protocol framing.
PAYLOAD_HEADROOM = 4096

_FIRST = itemgetter(0)
_NUMERIC = frozenset((int, float, type(None)))


@dataclass(frozen=True)
class OutgoingBatch:
    shard: int
    log_ids: tuple[int, ...]
    batch: ChangeBatch | None  # the rows as objects, when a caller built them so (tests); else None
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
    into the next read. Batches arrive grouped by shard (build_rows sorts them).
    """
    flagged = []
    for index, outgoing in enumerate(batches):
        last_of_shard = index + 1 == len(batches) or batches[index + 1].shard != outgoing.shard
        more = read_was_cut or not last_of_shard
        flagged.append(replace(outgoing, more=True) if more else outgoing)
    return flagged


def estimate_row_tuple_bytes(row: LogRow) -> int:
    """A cheap upper-bound-ish size of a raw log row (id, layout, op, values...) on the wire."""
    size = 16
    for value in row[3:]:
        if isinstance(value, (str, bytes)):
            size += len(value) + 5
        else:
            size += 9
    return size


def estimate_chunk_bytes(chunk: Sequence[LogRow]) -> int:
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


def cbor_items(chunk: Sequence[LogRow], body: BodyMap) -> int:
    """An upper bound of the CBOR items in a chunk's body (receivers refuse > MAX_CBOR_ITEMS).

    Per row its array, group, version, values array and values (len(row) - 3 + 4); per group
    and table their names.
    """
    groups: list[list[Any]] = body["g"]
    return sum(map(len, chunk)) + len(chunk) + sum(2 * len(g[2]) + 16 for g in groups) + 16


class BatchBuilder:
    """Turns one read of pending log rows into encoded per-shard batches within the limits."""

    def __init__(
        self,
        node_id: int,
        replication: ReplicationSettings,
        max_payload: int,
    ):
        self.node_id = node_id
        self.replication = replication
        self.max_payload = max(1024, max_payload - PAYLOAD_HEADROOM)
        self.max_bytes = min(replication.batch.max_bytes, self.max_payload)
        self.max_rows = max(1, replication.batch.max_rows)
        # No schema state here: every log row names the layout it was captured with.

    def build_rows(self, read: PendingRows) -> list[OutgoingBatch]:
        """Encoded per-shard batches straight from raw log rows (no per-row objects), in shard
        order, each shard's rows in commit order."""
        rows = read.rows
        if not rows:
            return []
        shards = self.replication.shards
        per_shard: dict[int, list[LogRow]]
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
                if len(chunk) > 1 and estimate_chunk_bytes(chunk) > self.max_bytes:
                    chunk = chunk[: self._rows_within_bytes(chunk)]
                batches.extend(self._encode_rows(shard, chunk, read.layouts))
                start += len(chunk)
        return batches

    def _rows_within_bytes(self, chunk: Sequence[LogRow]) -> int:
        """How many leading rows fit max_bytes (at least one). Only for chunks of large rows."""
        total = 0
        for count, row in enumerate(chunk):
            size = estimate_row_tuple_bytes(row)
            if count and total + size > self.max_bytes:
                return count
            total += size
        return len(chunk)

    def _encode_rows(self, shard: int, chunk: list[LogRow], layouts: Mapping[int, LogLayout]) -> list[OutgoingBatch]:
        body = codec.log_rows_body(self.node_id, chunk, layouts)
        if len(chunk) > 1 and cbor_items(chunk, body) > codec.MAX_CBOR_ITEMS:
            middle = len(chunk) // 2
            return self._encode_rows(shard, chunk[:middle], layouts) + self._encode_rows(shard, chunk[middle:], layouts)
        payload = codec.encode_body(body, self.replication.compression)
        log_ids = tuple(map(_FIRST, chunk))
        if len(payload) > self.max_payload:
            if len(chunk) == 1:
                return self._large_row(shard, log_ids, body, layouts[chunk[0][1]].table)
            middle = len(chunk) // 2  # the estimate was off (incompressible data): split and retry
            return self._encode_rows(shard, chunk[:middle], layouts) + self._encode_rows(shard, chunk[middle:], layouts)
        return [OutgoingBatch(shard, log_ids, None, payload, codec.message_id(self.node_id, log_ids, payload))]

    def _large_row(self, shard: int, log_ids: tuple[int, ...], body: BodyMap, table: str) -> list[OutgoingBatch]:
        """One row too large for a message: its fragments, flagged as one run (mark_continuations).

        Only the last fragment carries the row's log id, so the row is marked published only
        once every fragment was acknowledged (a shard's batches after a failed one are never
        marked). A row beyond codec.MAX_ROW_BODY_BYTES cannot travel at all: it comes back as
        an `oversized` batch that is never sent, which the publisher dead-letters on this node
        and retires, so the rows after it flow on.
        """
        try:
            payloads = codec.fragment_payloads(body, self.max_payload - codec.FRAGMENT_OVERHEAD, self.replication.compression)
        except codec.CodecError as exc:
            reason = f"a change of table {table!r} (log id {log_ids[0]}) cannot be replicated: {exc}"
            return [OutgoingBatch(shard, log_ids, None, b"", f"{self.node_id}-{log_ids[0]}-oversized", oversized=reason)]
        row_id = codec.message_id(self.node_id, log_ids, payloads[0] + payloads[-1])
        count = len(payloads)
        return [
            OutgoingBatch(shard, log_ids if index == count - 1 else (), None, payload, f"{row_id}-{index + 1}of{count}")
            for index, payload in enumerate(payloads)
        ]
