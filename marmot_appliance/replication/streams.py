"""The shard streams: created, or checked and brought in line with the spec, at start.

One stream per shard, `<stream_prefix>-<n>` capturing `<subject_prefix>-<n>.*` (n = 1..N; the
last token is the publishing node's id, see docs/wire-format.md),
file storage, limits retention keeping the newest `max_log_entries` messages, `num_replicas`
copies. A duplicate window makes `Nats-Msg-Id` de-duplicate a publish retried after a crash.

Also the two waits every JetStream user here needs right after servers start: for a stream's
leader, and `retry_while_settling` for idempotent set-up requests that time out meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, StreamInfo

from marmot_appliance.errors import MarmotError
from marmot_appliance.natsd.permissions import shard_stream_subjects
from marmot_appliance.replication.sharding import shard_numbers
from marmot_appliance.retry import backoff_delay, sleep_or_stop
from marmot_appliance.spec.model import ReplicationSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Long enough to cover a crash + restart of the node runtime; JetStream keeps the ids in memory.
DUPLICATE_WINDOW_S = 600.0
LEADER_TIMEOUT_S = 30.0  # a just-created replicated stream elects its leader within seconds


class StreamSetupError(MarmotError):
    """A shard stream could not be created or does not match the spec in a way we cannot fix."""


def stream_config(replication: ReplicationSettings, shard: int, replicas: int) -> StreamConfig:
    return StreamConfig(
        name=replication.stream_name(shard),
        description=f"marmot-appliance change log, shard {shard}",
        # One token per origin under the shard subject: the servers let each node publish only
        # on its own token, and receivers check the token against the origin in the body.
        subjects=shard_stream_subjects(replication, shard),
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_msgs=replication.max_log_entries,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        allow_direct=True,
        deny_delete=True,
        deny_purge=True,
    )


async def ensure_stream(js: JetStreamContext, wanted: StreamConfig, timeout_s: float = 10.0) -> StreamInfo:
    """Create the stream, or update replicas / retention of an existing one to match."""
    if wanted.name is None:  # nats-py's StreamConfig allows it; every config built here has one
        raise StreamSetupError("cannot set up a stream without a name")
    try:
        info = await js.stream_info(wanted.name)
    except nats.js.errors.NotFoundError:
        try:
            log.info("creating stream %s (replicas=%s, max_msgs=%s)", wanted.name, wanted.num_replicas, wanted.max_msgs)
            return await js.add_stream(wanted)
        except nats.js.errors.APIError as exc:
            raise StreamSetupError(f"cannot create stream {wanted.name}: {exc.description or exc}") from exc
    current = info.config
    if set(current.subjects or []) == {legacy_subject(wanted)}:
        # Created by a version without per-origin subject tokens: capture the tokens from now
        # on (messages already stored keep their subject and stay readable).
        log.info("stream %s: capturing per-origin subjects %s", wanted.name, wanted.subjects)
        current = current.evolve(subjects=list(wanted.subjects or []))
        drift_subjects = True
    else:
        drift_subjects = False
    if set(current.subjects or []) != set(wanted.subjects or []):
        raise StreamSetupError(
            f"stream {wanted.name} exists with subjects {current.subjects}, expected {wanted.subjects}; "
            "another cluster or a different subject prefix uses this stream name"
        )
    drift = {
        field: (getattr(current, field), getattr(wanted, field))
        for field in ("num_replicas", "max_msgs", "duplicate_window", "deny_purge")
        if getattr(current, field) != getattr(wanted, field)
    }
    if not drift and not drift_subjects:
        return info
    log.info("updating stream %s: %s", wanted.name, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in drift.items()))
    updated = current.evolve(
        num_replicas=wanted.num_replicas,
        max_msgs=wanted.max_msgs,
        duplicate_window=wanted.duplicate_window,
        deny_purge=wanted.deny_purge,
    )
    try:
        return await js.update_stream(updated)
    except nats.js.errors.APIError as exc:
        raise StreamSetupError(f"cannot update stream {wanted.name}: {exc.description or exc}") from exc


def legacy_subject(wanted: StreamConfig) -> str:
    """The single subject a shard stream captured before per-origin tokens (`<prefix>-<n>`)."""
    return (wanted.subjects or [""])[0].removesuffix(".*")


def origin_of_subject(subject: str, shard_subject: str) -> int | None:
    """The origin token of a change message's subject (`<shard_subject>.<origin>`).

    None for a message stored before per-origin subjects existed (exactly `shard_subject`: no
    client can publish there any more, the stream no longer captures it). Raises ValueError
    for anything else, which the caller treats as a forged message."""
    if subject == shard_subject:
        return None
    prefix, _, token = subject.rpartition(".")
    if prefix != shard_subject or not token.isdigit() or token.startswith("0"):
        raise ValueError(f"subject {subject!r} is not {shard_subject}.<origin id>")
    return int(token)


async def ensure_streams(js: JetStreamContext, replication: ReplicationSettings, replicas: int) -> list[StreamInfo]:
    """Create or check every shard stream and wait for its leader (so the first publish after
    this returns is answered). Raises StreamSetupError with a readable reason."""
    infos = []
    for shard in shard_numbers(replication.shards):
        name = replication.stream_name(shard)
        infos.append(await ensure_stream(js, stream_config(replication, shard, replicas)))
        if not await wait_for_stream_leader(js, name, LEADER_TIMEOUT_S):
            raise StreamSetupError(f"stream {name} has elected no leader after {LEADER_TIMEOUT_S:g}s")
    return infos


async def wait_for_stream_leader(js: JetStreamContext, stream: str, timeout_s: float = 30.0) -> bool:
    """Wait until a replicated stream has elected its leader; False if it did not in time.

    A just-created R3 stream answers publishes only once its leader is elected; without this
    wait the very first publish can fail with "no responders". While there is no leader (an
    election under load, servers down) STREAM.INFO may get no answer at all: that is "not yet",
    not a failure, so settling errors are waited through up to the same deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            info = await js.stream_info(stream)
            if info.cluster is None or info.cluster.leader:
                return True
        except Exception as exc:  # noqa: BLE001 - classified right below
            if not is_settling_error(exc):
                raise
            log.debug("stream %s: no answer while waiting for its leader (%s)", stream, exc or type(exc).__name__)
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)


def stream_instance(info: StreamInfo) -> str | None:
    """Which incarnation of a stream this is: its creation time as JetStream records it (the
    same on every server and across restarts; a deleted and re-created stream gets a new one)."""
    created = getattr(info, "created", None)
    if created is None:
        return None
    return created.isoformat() if hasattr(created, "isoformat") else str(created)


# "no suitable peers for placement" (JetStream's JSClusterNoPeersErrF). With ", peer offline" it
# names a peer the meta leader has not seen current yet: for a moment after any server starts
# (and under load, when one misses its heartbeats) placing a replicated stream fails this way.
NO_PEERS_ERR_CODE = 10005


def is_settling_error(exc: BaseException) -> bool:
    """A JetStream request that may well succeed if repeated (a cluster still settling)."""
    if isinstance(exc, (nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError)):
        return True
    if not isinstance(exc, nats.js.errors.APIError):
        return False
    if exc.code == 503:
        return True
    return exc.err_code == NO_PEERS_ERR_CODE and "offline" in str(exc.description or "")


async def retry_while_settling(
    what: str,
    request: Callable[[], Awaitable[T]],
    timeout_s: float,
    retryable: Callable[[BaseException], bool] = is_settling_error,
    stop: asyncio.Event | None = None,
) -> T:
    """Run `request()` (a coroutine factory) until it succeeds, repeating `retryable` errors
    with growing pauses for up to `timeout_s`; then the last error is raised.

    Only for idempotent set-up requests (create-or-check a stream, open a bucket, create a
    consumer, read state): right after servers start they can time out while JetStream settles.
    A set `stop` ends the wait early with a MarmotError.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    attempt = 0
    while True:
        delay = backoff_delay(attempt, 0.2, 5.0)
        try:
            return await request()
        except Exception as exc:  # noqa: BLE001 - classified right below
            if not retryable(exc) or loop.time() + delay > deadline:
                raise
            log.warning("%s: JetStream not ready (%s); retrying in %.1fs", what, exc or type(exc).__name__, delay)
        if await sleep_or_stop(stop, delay):
            raise MarmotError(f"stopped before {what} finished")
        attempt += 1
