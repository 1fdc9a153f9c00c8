"""Which delivered messages a shard consumer applies together, in one SQLite transaction.

Messages already buffered join (fewer commits while catching up), up to MAX_GROUP. A
publisher's run of messages flagged MORE_HEADER (rows committed together, docs/wire-format.md)
is applied in one transaction, past MAX_GROUP if need be, within bounds: a run whose end does
not arrive in time (its publisher died or is backing off) or that grows past the size cap is
applied as far as it got. The cap counts bytes before compression: while a publisher is far
behind, its rounds stop at their row limit and a run goes on round after round; the cap keeps
the memory of one group bounded.
"""

from __future__ import annotations

import logging

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication import codec

# The consumer's logger: what an operator filters on stays one name across its modules.
log = logging.getLogger("marmot_appliance.replication.consumer")

MAX_GROUP = 64  # messages applied in one SQLite transaction when several are buffered
OPEN_RUN_WAIT_S = 2.0
MAX_RUN_BYTES = 32 * 1024 * 1024


async def gather(
    sub: JetStreamContext.PushSubscription,
    first: Msg,
    *,
    node_id: int,
    stream: str,
    metrics: Metrics,
    buffered_wait_s: float,
) -> list[Msg]:
    """The messages to apply in one SQLite transaction, starting with `first`.

    A lone message is applied at once. While some origin's run is open (its last message
    carried MORE_HEADER), the group waits for the run's end, past MAX_GROUP, bounded by
    OPEN_RUN_WAIT_S per message and MAX_RUN_BYTES (before compression). buffered_wait_s bounds
    the wait for a message the subscription says it holds already.
    """
    group = [first]
    open_runs: set[str] = set()
    track_run(open_runs, first, node_id)
    size = codec.uncompressed_size(first.data)
    while len(group) < MAX_GROUP or open_runs:
        if sub.pending_msgs > 0:
            wait_s = buffered_wait_s
        elif open_runs:
            wait_s = OPEN_RUN_WAIT_S
        else:
            break
        try:
            msg = await sub.next_msg(timeout=wait_s)
        except nats.errors.TimeoutError:
            metrics.inc("runs_split")
            log.info("stream %s: the end of a run from node(s) %s did not arrive within %.0fs; "
                     "applying what arrived", stream, ", ".join(sorted(open_runs)), wait_s)
            break
        group.append(msg)
        track_run(open_runs, msg, node_id)
        size += codec.uncompressed_size(msg.data)
        if size >= MAX_RUN_BYTES:
            metrics.inc("runs_split")
            break
    return group


def track_run(open_runs: set[str], msg: Msg, node_id: int) -> None:
    """Note whether `msg`'s origin has a run still open (it carried MORE_HEADER)."""
    headers = msg.headers or {}
    origin = headers.get(codec.ORIGIN_HEADER, "")
    if origin == str(node_id):
        return  # our own messages are skipped, not applied
    if headers.get(codec.MORE_HEADER):
        open_runs.add(origin)
    else:
        open_runs.discard(origin)
