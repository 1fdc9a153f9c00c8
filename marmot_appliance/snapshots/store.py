"""Where snapshots live: a JetStream object-store bucket plus a KV manifest.

Objects are stored in the standard object-store layout (`OBJ_<bucket>` stream, chunks on
`$O.<bucket>.C.<nuid>`, metadata on `$O.<bucket>.M.<name>`), so the `nats object` tools read
them too. Two things differ from nats-py's own `put`/`get`, on purpose:

- upload keeps several chunk publishes in flight (acks awaited in a bounded window) instead of
  one round trip per chunk;
- download fetches one chunk at a time with direct gets and writes it to a file, so memory stays
  flat whatever the size (nats-py's `get` pushes through an ordered consumer whose buffer is
  bounded only by flow control).

Both compute SHA-256 on the fly. The manifest (see manifest.py) records the digest; download
verifies it before anything is restored.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import Header, ObjectInfo, ObjectMetaOptions, PubAck
from nats.js.kv import KeyValue

from marmot_appliance.replication.streams import retry_while_settling, wait_for_stream_leader
from marmot_appliance.retry import backoff_delay
from marmot_appliance.snapshots.errors import ChecksumMismatchError, NoSnapshotError, SnapshotError
from marmot_appliance.snapshots.manifest import Manifest, SnapshotInfo
from marmot_appliance.snapshots.progress import ProgressCallback, no_progress

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_KEY = "manifest"
CHUNK_SIZE = 256 * 1024  # measured: 256 KiB with 8 in flight beats larger chunks on a 3-server R3 cluster
UPLOAD_WINDOW = 8  # chunk publishes awaiting their ack; bounds upload memory to window * chunk
REQUEST_TIMEOUT_S = 30.0  # one chunk publish or fetch; generous, a busy R3 cluster can be slow
DEFAULT_LEASE_TTL_S = 30.0
# Opening the buckets is idempotent; timed-out attempts (JetStream settling) are repeated this long.
OPEN_TIMEOUT_S = 60.0
SHA_HEADER = "Marmot-Sha256"


class ManifestConflictError(SnapshotError):
    """The manifest changed between our read and our write (someone else published)."""


def manifest_bucket_name(bucket: str) -> str:
    return f"{bucket}-index"


def lease_bucket_name(bucket: str) -> str:
    return f"{bucket}-lease"


NO_RESPONDER_ERRORS = (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError)
NO_RESPONDER_RETRIES = 6


async def retry_no_responders(request: Callable[[], Awaitable[T]], attempts: int = NO_RESPONDER_RETRIES) -> T:
    """Run `request()` (a coroutine factory), retrying while JetStream has no responder yet.

    Safe for compare-and-set writes: a request that got no responder was not stored.
    """
    for attempt in range(attempts):
        try:
            return await request()
        except NO_RESPONDER_ERRORS:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(backoff_delay(attempt, 0.1, math.inf))  # NO_RESPONDER_RETRIES bounds it
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _wait_for_leader(js: JetStreamContext, stream: str, timeout_s: float = 30.0) -> None:
    if not await wait_for_stream_leader(js, stream, timeout_s):
        raise SnapshotError(f"stream {stream} has no leader after {timeout_s:g}s")


def _reads_from_leader(kv: KeyValue) -> KeyValue:
    """Every read of these buckets backs a compare-and-set (manifest, lease, snapshot requests),
    so it must see the newest revision. nats-py reads a KV with direct gets when the stream allows
    them, and any replica may answer those: a follower that has not caught up yet returns an old
    revision or "key not found" (CI saw nats-py's `create` turn such a read into KeyNotFoundError).
    Reads through the stream leader are consistent; these buckets are read seldom."""
    kv._direct = False  # nats-py has no public switch for this (2.x); tests/test_snapshot_requests.py checks it
    return kv


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


class SnapshotStore:
    """The snapshot bucket, its manifest and its lease bucket, for one cluster."""

    def __init__(self, js: JetStreamContext, bucket: str, manifest_kv: KeyValue, lease_kv: KeyValue, direct: bool):
        self.js = js
        self.bucket = bucket
        self.stream = f"OBJ_{bucket}"
        self.manifest_kv = manifest_kv
        self.lease_kv = lease_kv
        self._direct = direct

    # ---- setup -------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        bucket: str,
        replicas: int,
        create: bool = True,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    ) -> "SnapshotStore":
        """Open (and with `create`, create on first use) the buckets. Same config is idempotent,
        so a request that timed out (JetStream still settling after a server start; seen in CI)
        is simply repeated, for up to OPEN_TIMEOUT_S."""

        async def open_buckets() -> "SnapshotStore":
            direct = await cls._ensure_object_bucket(js, bucket, replicas, create)
            manifest_kv = await cls._ensure_kv(js, manifest_bucket_name(bucket), replicas, create, history=8, ttl=None)
            lease_kv = await cls._ensure_kv(js, lease_bucket_name(bucket), replicas, create, history=1, ttl=lease_ttl_s)
            return cls(js, bucket, manifest_kv, lease_kv, direct)

        try:
            return await retry_while_settling(f"opening snapshot bucket {bucket!r}", open_buckets, OPEN_TIMEOUT_S)
        except nats.js.errors.APIError as exc:
            raise SnapshotError(f"cannot open snapshot bucket {bucket!r}: {exc.description or exc}") from exc
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError) as exc:
            raise SnapshotError(f"timed out opening snapshot bucket {bucket!r}: is JetStream available?") from exc

    @staticmethod
    async def _ensure_object_bucket(js: JetStreamContext, bucket: str, replicas: int, create: bool) -> bool:
        stream = f"OBJ_{bucket}"
        try:
            info = await js.stream_info(stream)
            return bool(info.config.allow_direct)
        except nats.js.errors.NotFoundError:
            if not create:
                raise NoSnapshotError(f"snapshot bucket {bucket!r} does not exist: no snapshot was ever saved") from None
        await js.create_object_store(bucket, description="marmot-appliance snapshots", replicas=replicas)
        await _wait_for_leader(js, stream)
        return True

    @staticmethod
    async def _ensure_kv(
        js: JetStreamContext, name: str, replicas: int, create: bool, history: int, ttl: float | None
    ) -> KeyValue:
        try:
            return _reads_from_leader(await js.key_value(name))
        except nats.js.errors.BucketNotFoundError:
            if not create:
                raise NoSnapshotError(f"snapshot index {name!r} does not exist: no snapshot was ever saved") from None
        params: dict[str, Any] = {"bucket": name, "history": history, "replicas": replicas}
        if ttl:
            params["ttl"] = ttl
        kv = await js.create_key_value(**params)
        await _wait_for_leader(js, f"KV_{name}")
        return _reads_from_leader(kv)

    # ---- manifest ----------------------------------------------------------------------------

    async def read_manifest(self) -> tuple[Manifest, int]:
        """The current manifest and its KV revision (0 when none was ever published)."""
        try:
            entry = await self.manifest_kv.get(MANIFEST_KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return Manifest(), 0
        return Manifest.decode(entry.value or b""), int(entry.revision or 0)

    async def publish_manifest(self, manifest: Manifest, expected_revision: int) -> int:
        """Compare-and-set: succeeds only if nobody published since `expected_revision`."""
        try:
            if expected_revision == 0:
                return await retry_no_responders(lambda: self.manifest_kv.create(MANIFEST_KEY, manifest.encode()))
            return await retry_no_responders(
                lambda: self.manifest_kv.update(MANIFEST_KEY, manifest.encode(), last=expected_revision)
            )
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise ManifestConflictError(
                "the snapshot manifest changed while this snapshot was being saved; not published"
            ) from exc

    # ---- objects -----------------------------------------------------------------------------

    async def upload(self, path: Path, name: str, progress: ProgressCallback = no_progress) -> tuple[int, str]:
        """Stream `path` into object `name`; returns (size, sha256 hex). Chunks first, meta last.

        A stream just created (or whose leader just moved) can briefly have no responder on a
        server we are connected to; such an upload starts over on a fresh chunk subject.
        """
        for attempt in range(NO_RESPONDER_RETRIES):
            try:
                return await self._upload_once(path, name, progress)
            except SnapshotError as exc:
                if not isinstance(exc.__cause__, NO_RESPONDER_ERRORS) or attempt == NO_RESPONDER_RETRIES - 1:
                    raise
                log.info("snapshot upload found no stream responder yet; starting over")
                await asyncio.sleep(backoff_delay(attempt, 0.1, math.inf))  # NO_RESPONDER_RETRIES bounds it
        raise AssertionError("unreachable")

    async def _upload_once(self, path: Path, name: str, progress: ProgressCallback) -> tuple[int, str]:
        nuid = uuid.uuid4().hex
        chunk_subject = f"$O.{self.bucket}.C.{nuid}"
        digest = hashlib.sha256()
        size = 0
        chunks = 0
        in_flight: deque[asyncio.Future[PubAck]] = deque()

        def read_chunk(handle: BinaryIO) -> bytes:
            data = handle.read(CHUNK_SIZE)
            digest.update(data)  # hashing in the worker thread keeps the event loop free
            return data

        try:
            with open(path, "rb") as handle:
                while True:
                    data = await asyncio.to_thread(read_chunk, handle)
                    if not data:
                        break
                    in_flight.append(await self.js.publish_async(chunk_subject, data))
                    size += len(data)
                    chunks += 1
                    if len(in_flight) >= UPLOAD_WINDOW:
                        await asyncio.wait_for(in_flight.popleft(), REQUEST_TIMEOUT_S)
                    progress(size)
                while in_flight:
                    await asyncio.wait_for(in_flight.popleft(), REQUEST_TIMEOUT_S)
            sha_hex = digest.hexdigest()
            info = ObjectInfo(
                name=name,
                bucket=self.bucket,
                nuid=nuid,
                size=size,
                chunks=chunks,
                mtime=datetime.now(timezone.utc).isoformat(),
                digest="SHA-256=" + _b64(digest.digest()),
                description="marmot-appliance snapshot",
                headers={SHA_HEADER: sha_hex},
                options=ObjectMetaOptions(max_chunk_size=CHUNK_SIZE),
            )
            meta_subject = f"$O.{self.bucket}.M.{_b64(name.encode())}"
            await self.js.publish(
                meta_subject,
                json.dumps(info.as_dict()).encode(),
                headers={Header.ROLLUP: "sub"},
                timeout=REQUEST_TIMEOUT_S,
            )
        except BaseException as exc:
            for future in in_flight:
                future.cancel()
            await self._purge_quietly(chunk_subject)
            if isinstance(exc, (nats.errors.Error, asyncio.TimeoutError, OSError)):
                raise SnapshotError(f"uploading snapshot {name}: {exc!r}") from exc
            raise
        return size, sha_hex

    async def object_info(self, name: str) -> ObjectInfo:
        objects = await self.js.object_store(self.bucket)
        try:
            return await objects.get_info(name)
        except nats.js.errors.ObjectNotFoundError as exc:
            raise SnapshotError(f"snapshot object {name} is missing from bucket {self.bucket}") from exc

    async def verify_uploaded(self, name: str, size: int, sha_hex: str) -> None:
        """Read back the stored metadata: the server holds exactly the bytes we hashed."""
        info = await self.object_info(name)
        expected_digest = "SHA-256=" + _b64(bytes.fromhex(sha_hex))
        if info.size != size or info.digest != expected_digest:
            raise SnapshotError(
                f"snapshot {name} was stored as {info.size} bytes / {info.digest}, expected {size} / {expected_digest}"
            )
        stream_info = await self.js.stream_info(self.stream, subjects_filter=f"$O.{self.bucket}.C.{info.nuid}")
        stored_chunks = (stream_info.state.subjects or {}).get(f"$O.{self.bucket}.C.{info.nuid}", 0)
        if stored_chunks != info.chunks:
            raise SnapshotError(f"snapshot {name}: {stored_chunks} of {info.chunks} chunks are stored")

    async def download(self, snapshot: SnapshotInfo, dest: Path, progress: ProgressCallback = no_progress) -> None:
        """Stream the object into `dest`, verifying size and SHA-256 against the manifest."""
        info = await self.object_info(snapshot.name)
        chunk_subject = f"$O.{self.bucket}.C.{info.nuid}"
        digest = hashlib.sha256()
        done = 0
        seq = 0
        try:
            with open(dest, "wb") as handle:
                for _ in range(info.chunks or 0):
                    try:
                        msg = await self.js.get_msg(
                            self.stream, seq=seq + 1, subject=chunk_subject, next=True, direct=self._direct
                        )
                    except nats.js.errors.NotFoundError as exc:
                        raise ChecksumMismatchError(
                            f"snapshot {snapshot.name} is incomplete: chunk {done // CHUNK_SIZE + 1} "
                            f"of {info.chunks} is missing from the object store"
                        ) from exc
                    seq = int(msg.seq or seq + 1)
                    data = msg.data or b""
                    digest.update(data)
                    await asyncio.to_thread(handle.write, data)
                    done += len(data)
                    progress(done)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            raise SnapshotError(f"downloading snapshot {snapshot.name}: {exc!r}") from exc
        actual = digest.hexdigest()
        if done != snapshot.size or actual != snapshot.sha256:
            raise ChecksumMismatchError(
                f"snapshot {snapshot.name} (generation {snapshot.generation}, saved by {snapshot.node}) failed "
                f"verification: got {done} bytes with sha256 {actual}, the manifest records {snapshot.size} "
                f"bytes with sha256 {snapshot.sha256}; the stored copy is corrupt"
            )

    async def delete_object(self, name: str) -> None:
        objects = await self.js.object_store(self.bucket)
        try:
            await objects.delete(name)
        except nats.js.errors.ObjectNotFoundError:
            pass

    async def object_names(self) -> list[str]:
        """Every complete object in the bucket (for garbage collection, not to find the newest)."""
        objects = await self.js.object_store(self.bucket)
        try:
            return [info.name for info in await objects.list(ignore_deletes=True)]
        except nats.js.errors.NotFoundError:
            return []

    async def _purge_quietly(self, subject: str) -> None:
        try:
            await self.js.purge_stream(self.stream, subject=subject)
        except Exception as exc:  # cleanup of a failed upload must not hide the original error
            log.warning("could not purge chunks of a failed snapshot upload (%s): %r", subject, exc)
