"""The change feed: every row change on a cluster's shard streams, for other applications.

    import asyncio
    from marmot_appliance.feed import changes

    async def main():
        async for change in changes("nats://127.0.0.1:4222", "marmot-changes", shards=1,
                                    from_="start", tables=["orders"]):
            print(change.stream, change.seq, change.op, change.table, change.pk, change.values)

    asyncio.run(main())

Each shard stream is followed by its own JetStream ordered consumer (ephemeral, in memory, no
acks: reading never disturbs the cluster). Records of one stream come in stream order; records
of different shard streams interleave in arrival order (with `shards: 1` there is one total
order). Messages are decoded by the replication codec itself, so the feed can never disagree
with what the nodes apply. docs/wire-format.md describes the bytes on the streams.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerConfig, DeliverPolicy

from marmot_appliance.errors import MarmotError
from marmot_appliance.nats_client import NatsConnectError, open_connection
from marmot_appliance.replication.codec import (
    MAX_ROW_BODY_BYTES,
    CodecError,
    Fragment,
    decode_assembled,
    decode_message,
)
from marmot_appliance.replication.streams import retry_while_settling
from marmot_appliance.replication.types import ChangeBatch, Operation
from marmot_appliance.spec.model import ReplicationSettings

log = logging.getLogger(__name__)

OPERATIONS: tuple[Operation, ...] = ("upsert", "delete")
REQUEST_TIMEOUT_S = 10.0
# How long set-up requests (stream info, consumer creation) are repeated on transient errors.
SETUP_RETRY_S = 60.0
# Ordered consumers are re-created by the client when heartbeats stop (e.g. a server restart).
IDLE_HEARTBEAT_S = 5.0
# Messages buffered between the NATS callbacks and the reader; a slow reader pauses delivery
# (JetStream flow control) instead of growing memory.
QUEUE_MESSAGES = 64
# How often an idle reader checks that the connection is still alive.
CLOSED_CHECK_S = 1.0


class FeedError(MarmotError):
    """The feed cannot start or continue: bad arguments, unreachable NATS, missing streams."""


@dataclass(frozen=True)
class ChangeRecord:
    """One row change as it sits on a shard stream.

    values maps column -> value for an upsert (the row's full new state) and the primary-key
    columns -> values for a delete (the tombstone). Values keep their SQLite storage class:
    int, float, str, bytes or None.
    """

    table: str
    op: Operation
    pk: tuple[Any, ...]
    values: dict[str, Any]
    version: int  # hybrid logical clock: (milliseconds since the epoch << 16) | counter
    origin: int  # node id that made the change
    stream: str
    seq: int  # stream sequence of the message carrying the change
    time: datetime  # when JetStream stored that message (UTC)

    @property
    def version_time(self) -> datetime:
        """The writing node's clock when it made the change (the version's millisecond part)."""
        return datetime.fromtimestamp((self.version >> 16) / 1000, tz=timezone.utc)

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; BLOBs and non-finite floats get type markers (see json_value)."""
        return {
            "table": self.table,
            "op": self.op,
            "pk": [json_value(v) for v in self.pk],
            "values": {column: json_value(v) for column, v in self.values.items()},
            "version": self.version,
            "origin": self.origin,
            "stream": self.stream,
            "seq": self.seq,
            "time": self.time.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
        }


def json_value(value: Any) -> Any:
    """A SQLite value in JSON. Plain JSON where JSON is exact, a one-key marker object otherwise:

    BLOB               {"$base64": "<standard base64>"}
    NaN, +inf, -inf    {"$float": "nan" | "inf" | "-inf"}
    INTEGER, TEXT, NULL and finite REAL are plain JSON (REALs print with Python's shortest
    round-tripping repr, -0.0 included). No value is otherwise an object, so markers are unambiguous.
    """
    if isinstance(value, bytes):
        return {"$base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    return value


@dataclass(frozen=True)
class StartPosition:
    """Where each shard stream is read from."""

    policy: DeliverPolicy
    seq: int | None = None
    time: datetime | None = None

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(
            deliver_policy=self.policy, opt_start_seq=self.seq, opt_start_time=self.time
        )


def parse_start(from_: str | int | datetime) -> StartPosition:
    """'now' (new changes only), 'start' (everything retained), a stream sequence (>= 1; applies
    to every shard stream) or a time (ISO 8601; without an offset it is local time)."""
    if isinstance(from_, datetime):
        moment = from_ if from_.tzinfo else from_.astimezone()
        return StartPosition(DeliverPolicy.BY_START_TIME, time=moment.astimezone(timezone.utc))
    if isinstance(from_, int) and not isinstance(from_, bool):
        if from_ < 1:
            raise FeedError(f"start sequence must be >= 1, got {from_}")
        return StartPosition(DeliverPolicy.BY_START_SEQUENCE, seq=from_)
    if not isinstance(from_, str):
        raise FeedError(f"cannot start from {from_!r}: use now, start, a sequence or an ISO time")
    text = from_.strip()
    if text.lower() == "now":
        return StartPosition(DeliverPolicy.NEW)
    if text.lower() in ("start", "beginning", "all"):
        return StartPosition(DeliverPolicy.ALL)
    if text.isdigit():
        return parse_start(int(text))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise FeedError(
            f"cannot start from {from_!r}: use now, start, a stream sequence (e.g. 42) "
            "or an ISO 8601 time (e.g. 2024-05-01T12:00:00Z)"
        ) from None
    return parse_start(moment)


def _check_filters(tables: Iterable[str] | None, ops: Iterable[str] | None):
    table_filter = frozenset(tables) if tables else None
    op_filter = frozenset(ops) if ops else None
    if op_filter and not op_filter <= set(OPERATIONS):
        unknown = ", ".join(sorted(op_filter - set(OPERATIONS)))
        raise FeedError(f"unknown operation {unknown}: expected {' or '.join(OPERATIONS)}")
    return table_filter, op_filter


async def _connect(target: str | NatsClient, connect_options: dict | None) -> tuple[NatsClient, bool]:
    """(connection, owned). A connection passed in is used as is and left open."""
    if isinstance(target, NatsClient):
        if not target.is_connected:
            raise FeedError("the NATS connection passed to changes() is not connected")
        return target, False
    if not isinstance(target, str) or not target.strip():
        raise FeedError("give a NATS URL (comma-separated for several servers) or a connection")
    options = dict(connect_options or {})
    options.setdefault("servers", [url.strip() for url in target.split(",") if url.strip()])
    options.setdefault("connect_timeout", 5)
    opened: list[NatsClient] = []

    async def note_disconnect() -> None:
        # Also called when we close the connection ourselves; only a lost server is news.
        if opened and not (opened[0].is_closed or opened[0].is_draining):
            log.warning("disconnected from NATS; reconnecting")

    options.setdefault("disconnected_cb", note_disconnect)
    options.setdefault("reconnected_cb", _note_reconnect)
    # Once connected, riding out a server restart is right; the first connection is bounded
    # to about one round over the servers (nats_client.open_connection), with one message.
    try:
        connection = await open_connection(options, long_lived=True)
    except NatsConnectError as exc:
        raise FeedError(str(exc)) from exc
    opened.append(connection)
    return connection, True


async def _note_reconnect() -> None:
    log.warning("reconnected to NATS")


async def discover_shards(js, stream_prefix: str) -> list[str]:
    """Names of the `<stream_prefix>-<n>` streams that exist, in shard order."""
    pattern = re.compile(re.escape(stream_prefix) + r"-([1-9][0-9]*)")
    found: dict[int, str] = {}
    offset = 0
    while True:  # the stream list is paged
        page = await js.streams_info(offset=offset)
        for info in page:
            match = pattern.fullmatch(info.config.name or "")
            if match:
                found[int(match.group(1))] = info.config.name
        if len(page) == 0:
            break
        offset += len(page)
        if offset > 100_000:  # bounded: no cluster has that many streams
            break
    return [found[shard] for shard in sorted(found)]


async def _resolve_streams(
    js, stream_prefix: str, shards: int | None, subject_prefix: str | None
) -> list[tuple[str, list[str]]]:
    """[(stream, subjects)] for every shard stream; a clear FeedError when one is missing."""
    if shards is None:
        names = await discover_shards(js, stream_prefix)
        if not names:
            raise FeedError(
                f"no streams named {stream_prefix}-<n> exist yet; is a node running, "
                "and is the stream prefix right?"
            )
    else:
        names = [ReplicationSettings(stream_prefix=stream_prefix).stream_name(n) for n in range(1, shards + 1)]
    resolved = []
    for name in names:
        try:
            info = await retry_while_settling(f"reading {name}", partial(js.stream_info, name), SETUP_RETRY_S)
        except nats.js.errors.NotFoundError:
            raise FeedError(
                f"stream {name} does not exist; check the stream prefix and shard count "
                "(streams are created when the first node starts)"
            ) from None
        subjects = list(info.config.subjects or [])
        if subject_prefix is not None:
            shard = name.rsplit("-", 1)[1]
            expected = f"{subject_prefix}-{shard}.*"  # one token per origin (docs/wire-format.md)
            if expected not in subjects:
                raise FeedError(f"stream {name} captures {subjects}, not {expected}; check --subject-prefix")
        if not subjects:
            raise FeedError(f"stream {name} has no subjects")
        resolved.append((name, subjects))
    return resolved


async def changes(
    nats_url_or_conn: str | NatsClient,
    stream_prefix: str = ReplicationSettings.stream_prefix,
    shards: int | None = None,
    from_: str | int | datetime = "now",
    tables: Iterable[str] | None = None,
    ops: Iterable[str] | None = None,
    *,
    subject_prefix: str | None = None,
    connect_options: dict | None = None,
    credentials: str | Path | None = None,
    on_undecodable: Callable[[str, int, CodecError], None] | None = None,
) -> AsyncGenerator[ChangeRecord, None]:  # closable early: contextlib.aclosing
    """Every row change on the shard streams, as typed records.

    nats_url_or_conn: "nats://host:4222[,nats://...]" (connected here, drained at the end;
      connect_options go to nats.connect, e.g. user/password/tls) or a connected client.
    shards: how many `<stream_prefix>-<n>` streams; None discovers the existing ones.
    from_: "now" | "start" | a stream sequence | an ISO 8601 time / datetime.
    tables, ops: keep only these tables / operations ("upsert", "delete").
    subject_prefix: if given, each stream must capture `<subject_prefix>-<n>.*` (a sanity check).
    credentials: a JSON file {"user": ..., "password": ...}, e.g. the read-only reader identity
      `apply` writes to <state dir>/secrets/nats-reader.json (see docs/security.md).
    on_undecodable(stream, seq, error): called for a message the codec refuses, or whose origin
      does not match the node that published it (default: a logged warning); the feed goes on
      with the next message.

    Raises FeedError when NATS or a stream is unreachable. Close early with
    `contextlib.aclosing(changes(...))` (or break out of `async for` inside asyncio.run).
    """
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
        raise FeedError(f"shards must be a positive integer, got {shards!r}")
    if not isinstance(stream_prefix, str) or not stream_prefix:
        raise FeedError("stream prefix must be a non-empty string")
    start = parse_start(from_)
    table_filter, op_filter = _check_filters(tables, ops)
    report = on_undecodable or _warn_undecodable

    if credentials is not None:
        connect_options = {**read_credentials_file(credentials), **(connect_options or {})}
    connection, owned = await _connect(nats_url_or_conn, connect_options)
    queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_MESSAGES)
    subscriptions = []
    try:
        js = connection.jetstream(timeout=REQUEST_TIMEOUT_S)
        try:
            streams = await _resolve_streams(js, stream_prefix, shards, subject_prefix)
            for stream, subjects in streams:
                subscriptions.append(await _follow(js, stream, subjects, start, queue))
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError) as exc:
            raise FeedError(f"JetStream did not answer ({type(exc).__name__}); is JetStream enabled?") from exc
        except nats.js.errors.APIError as exc:
            raise FeedError(f"JetStream refused the consumer: {exc.description or exc}") from exc

        large_rows = LargeRows()
        while True:
            try:
                stream, msg = queue.get_nowait()
            except asyncio.QueueEmpty:
                stream, msg = await _next_message(queue, connection)
            seq, stored_at = _position(msg)
            try:
                # Off the event loop (the codec bounds size, items and nesting first).
                decoded = await asyncio.to_thread(decode_message, msg.data)
                if isinstance(decoded, Fragment):
                    forged = origin_mismatch(msg.subject, decoded.origin)
                    if forged:  # never let a forged piece join another node's row
                        raise CodecError(forged)
                    batch = await large_rows.add(stream, decoded)
                    if batch is None:
                        continue  # more pieces of the row follow
                else:
                    batch = decoded
            except CodecError as exc:
                report(stream, seq, exc)
                continue
            forged = origin_mismatch(msg.subject, batch.origin)
            if forged:
                report(stream, seq, CodecError(forged))
                continue
            for row in batch.rows:
                if table_filter is not None and row.table not in table_filter:
                    continue
                if op_filter is not None and row.op not in op_filter:
                    continue
                yield ChangeRecord(
                    table=row.table,
                    op=row.op,
                    pk=row.pk,
                    values=dict(zip(row.columns, row.values)),
                    version=row.version,
                    origin=row.origin,
                    stream=stream,
                    seq=seq,
                    time=stored_at,
                )
    finally:
        await _stop(connection, owned, subscriptions)


def read_credentials_file(path: str | Path) -> dict:
    """{"user", "password"} connect options from a credentials file (FeedError when unusable)."""
    try:
        data = json.loads(Path(path).read_text())
        return {"user": str(data["user"]), "password": str(data["password"])}
    except OSError as exc:
        raise FeedError(f"cannot read credentials file {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError):
        raise FeedError(f"credentials file {path} is not a JSON object with user and password") from None


def origin_mismatch(subject: str, origin: int) -> str | None:
    """Why a message's origin cannot be trusted, or None.

    Each node's identity may publish only on `<subject>.<its id>`, so a body claiming another
    origin was forged. A subject without a numeric last token was stored before per-origin
    subjects existed (nobody can publish there any more)."""
    token = subject.rpartition(".")[2]
    if token.isdigit() and int(token) != origin:
        return f"forged origin: body says node {origin} but it was published on {subject}"
    return None


class LargeRows:
    """Joins the fragments of rows larger than one message, per stream and origin, like the
    nodes do (docs/wire-format.md, "Large rows"); one row's pieces in memory at a time."""

    def __init__(self) -> None:
        self._pieces: dict[tuple[str, int], list[bytes]] = {}

    async def add(self, stream: str, fragment: Fragment) -> ChangeBatch | None:
        """The row's batch when `fragment` completes it, else None; CodecError when out of order
        (e.g. a feed started in the middle of a row: its pieces are reported and skipped)."""
        key = (stream, fragment.origin)
        if fragment.index == 0:
            self._pieces[key] = []
        pieces = self._pieces.get(key)
        if pieces is None or len(pieces) != fragment.index:
            self._pieces.pop(key, None)
            raise CodecError(
                f"fragment {fragment.index + 1} of {fragment.count} from node {fragment.origin} "
                "without the ones before it"
            )
        pieces.append(fragment.piece)
        if sum(map(len, pieces)) > MAX_ROW_BODY_BYTES:
            del self._pieces[key]
            raise CodecError(f"a large row from node {fragment.origin} passes {MAX_ROW_BODY_BYTES} bytes")
        if fragment.index < fragment.count - 1:
            return None
        del self._pieces[key]
        body = b"".join(pieces)
        return await asyncio.to_thread(_whole_row_batch, body)


def _whole_row_batch(body: bytes) -> ChangeBatch:
    """The object form of a reassembled large row (decode_assembled gives it for for_apply=False)."""
    batch = decode_assembled(body, for_apply=False)
    if not isinstance(batch, ChangeBatch):
        raise CodecError(f"a reassembled large row decoded to {type(batch).__name__}, not a change batch")
    return batch


async def _next_message(queue: asyncio.Queue, connection: NatsClient):
    """The next delivered message; FeedError once the connection has closed for good.

    nats-py rides out server restarts by reconnecting; when it gives up, the connection closes
    and no message will ever come, so waiting on would hang the reader silently.
    """
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=CLOSED_CHECK_S)
        except asyncio.TimeoutError:
            if connection.is_closed:
                raise FeedError("the connection to NATS closed (no server reachable); stopping") from None


async def _follow(js, stream: str, subjects: list[str], start: StartPosition, queue: asyncio.Queue):
    # "now" is pinned to the stream's next sequence, and every delivery below the start is
    # dropped: when nats-py re-creates an ordered consumer (missed heartbeats under load)
    # before it delivered anything, it restarts at sequence 1 and would replay history.
    if start.policy == DeliverPolicy.NEW:
        info = await retry_while_settling(f"reading {stream}", lambda: js.stream_info(stream), SETUP_RETRY_S)
        start = StartPosition(DeliverPolicy.BY_START_SEQUENCE, seq=info.state.last_seq + 1)
    first_seq = start.seq or 0
    first_time = start.time

    async def deliver(msg) -> None:
        seq, stored_at = _position(msg)
        if seq < first_seq or (first_time is not None and stored_at < first_time):
            return
        # Awaiting here pauses this subscription (and, via flow control, the server) while the
        # reader is behind; callbacks of one subscription run one at a time, in stream order.
        await queue.put((stream, msg))

    def subscribe():
        config = start.consumer_config()  # fresh each attempt: nats-py fills it in
        if len(subjects) > 1:
            config.filter_subjects = subjects
        return js.subscribe(
            subjects[0],
            stream=stream,
            cb=deliver,
            ordered_consumer=True,
            idle_heartbeat=IDLE_HEARTBEAT_S,
            config=config,
        )

    # Repeating a creation is safe: a consumer whose answer was lost has no subscriber, gets
    # no deliveries here and is removed by the server once inactive.
    return await retry_while_settling(f"following {stream}", subscribe, SETUP_RETRY_S)


def _position(msg) -> tuple[int, datetime]:
    metadata = msg.metadata
    return metadata.sequence.stream, metadata.timestamp


def _warn_undecodable(stream: str, seq: int, error: CodecError) -> None:
    log.warning("skipping %s seq %d: %s", stream, seq, error)


async def _stop(connection: NatsClient, owned: bool, subscriptions: list) -> None:
    """Remove our consumers; close the connection only if we opened it. Never hangs."""
    for subscription in subscriptions:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(subscription.unsubscribe(), timeout=2.0)
    if owned:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), timeout=5.0)
