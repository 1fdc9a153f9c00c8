"""Sending one round's messages with acks in flight, and reading the acks back in shard order.

The rule kept here: a shard stream is the order replicas see a key's changes, so once one of
a shard's messages fails (not sent, refused, or no ack in time) none of that shard's later
messages counts as acknowledged, even if its ack arrived; their rows stay pending and are
re-read in order. What the publisher does with the outcome (retire, count, dead-letter) stays
in publisher.py.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import cast

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck

from marmot_appliance.natsd.permissions import origin_subject
from marmot_appliance.observability.ack_timer import RoundAckTimer
from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication import codec
from marmot_appliance.replication.batching import OutgoingBatch
from marmot_appliance.spec.model import ReplicationSettings

ACK_TIMEOUT_S = 10.0

# A batch sent and the future of its ack (an oversized batch, never sent: done, with None).
Sent = list[tuple[OutgoingBatch, "asyncio.Future[PubAck | None]"]]


def headers_for(outgoing: OutgoingBatch, node_id: int) -> dict[str, str]:
    headers = {codec.MSG_ID_HEADER: outgoing.msg_id, codec.ORIGIN_HEADER: str(node_id)}
    if outgoing.more:
        headers[codec.MORE_HEADER] = "1"
    return headers


async def send_batches(
    js: JetStreamContext, replication: ReplicationSettings, node_id: int, metrics: Metrics, batches: list[OutgoingBatch]
) -> tuple[Sent, BaseException | None]:
    """publish_async every batch in order; stop at the first that cannot be sent."""
    in_flight: Sent = []
    failure: BaseException | None = None
    started = time.monotonic()
    for outgoing in batches:
        if outgoing.oversized:  # never sent: "acknowledged" at once, dead-lettered when retired
            done: asyncio.Future[PubAck | None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            in_flight.append((outgoing, done))
            continue
        try:
            future = await js.publish_async(
                # Our own origin token: the only subject our identity may publish on.
                origin_subject(replication, outgoing.shard, node_id),
                outgoing.payload,
                wait_stall=ACK_TIMEOUT_S,
                stream=replication.stream_name(outgoing.shard),
                headers=headers_for(outgoing, node_id),
            )
        except Exception as exc:  # noqa: BLE001 - stop sending; what is in flight still counts
            failure = exc
            break
        # Widened to the oversized entries' type; read only as PubAck once done.
        in_flight.append((outgoing, cast("asyncio.Future[PubAck | None]", future)))
    if failure is None:
        RoundAckTimer(metrics, started, [future for outgoing, future in in_flight if not outgoing.oversized])
    return in_flight, failure


@dataclass
class RoundAcks:
    """What a round's acks allow: log ids to retire, in shard order, and the first error."""

    acked: list[int] = field(default_factory=list)
    published: list[tuple[OutgoingBatch, PubAck]] = field(default_factory=list)
    oversized: list[OutgoingBatch] = field(default_factory=list)  # to dead-letter, ids in `acked`
    failure: BaseException | None = None


async def await_acks(in_flight: Sent, failure: BaseException | None, ack_deadline: float | None = None) -> RoundAcks:
    """Wait for the acks of sent batches (until `ack_deadline`, monotonic; else ACK_TIMEOUT_S
    from now); acks still missing then are cancelled and count as failed."""
    if in_flight:
        timeout_s = ACK_TIMEOUT_S if ack_deadline is None else max(0.0, ack_deadline - time.monotonic())
        done, not_done = await asyncio.wait([f for _, f in in_flight], timeout=timeout_s)
        for future in not_done:
            future.cancel()
        if not_done and failure is None:
            failure = nats.errors.TimeoutError()
    result = RoundAcks()
    blocked_shards: set[int] = set()
    for outgoing, future in in_flight:
        ok = future.done() and not future.cancelled() and future.exception() is None
        if not ok:
            blocked_shards.add(outgoing.shard)
            if failure is None and future.done() and not future.cancelled():
                failure = future.exception()
            continue
        if outgoing.shard in blocked_shards:
            continue  # keep a shard's rows in order: nothing after a failed batch is marked
        result.acked.extend(outgoing.log_ids)
        if outgoing.oversized:
            result.oversized.append(outgoing)
            continue
        ack = future.result()
        if ack is not None:  # always, once sent: only the oversized hold None
            result.published.append((outgoing, ack))
    # Batches never sent (publish_async raised) are simply not marked.
    result.failure = failure
    return result
