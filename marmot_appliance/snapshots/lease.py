"""One saver at a time, cluster-wide: a lease in a JetStream KV bucket.

- Acquire = `create` of the lease key: JetStream accepts it only if the key has no live value.
- Expiry is the bucket's max age, enforced by the JetStream servers themselves: a holder that
  dies stops renewing and its value ages out. No node ever compares its clock with another's.
- Renew = `update` with the revision we last wrote. If anyone else wrote in between (because
  ours expired and they acquired), the update is refused and we know we lost the lease.
- Fencing: the saver renews right before publishing the manifest, and the manifest itself is a
  compare-and-set on its own revision, so a saver that paused past its lease can never
  overwrite a newer manifest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from marmot_appliance.snapshots.errors import LeaseLostError, SnapshotBusyError, SnapshotError
from marmot_appliance.snapshots.store import retry_no_responders

log = logging.getLogger(__name__)

LEASE_KEY = "save"


class SnapshotLease:
    """Use as `async with SnapshotLease(kv, "n1"): ...`; renews itself in the background."""

    def __init__(self, kv: KeyValue, holder: str, ttl_s: float | None = None):
        self.kv = kv
        self.holder = holder
        self.token = uuid.uuid4().hex  # tells our own writes apart from a restarted us
        self.revision = 0
        self._ttl_s = ttl_s
        self._renewer: asyncio.Task[None] | None = None
        self._lost: BaseException | None = None
        # The background renewer and the fencing renew before publishing must not both send
        # an update with the same expected revision: one would fail and look like a lost lease.
        self._renew_lock = asyncio.Lock()

    def _value(self) -> bytes:
        return json.dumps({"holder": self.holder, "token": self.token}).encode()

    async def ttl_s(self) -> float:
        if self._ttl_s is None:
            status = await self.kv.status()
            self._ttl_s = float(status.ttl or 30.0)
        return self._ttl_s

    async def acquire(self) -> int:
        """Take the lease or raise SnapshotBusyError naming the current holder."""
        for _ in range(3):  # the holder's value may age out between our create and our get
            try:
                self.revision = await retry_no_responders(lambda: self.kv.create(LEASE_KEY, self._value()))
                log.debug("snapshot lease acquired by %s (revision %d)", self.holder, self.revision)
                return self.revision
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await self.kv.get(LEASE_KEY)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue
            try:
                holder = json.loads(entry.value or b"{}").get("holder", "another node")
            except ValueError:
                holder = "another node"
            raise SnapshotBusyError(holder)
        raise SnapshotBusyError("another node")

    async def renew(self) -> int:
        """Extend the lease; LeaseLostError when somebody else holds it now."""
        async with self._renew_lock:
            if self._lost is not None:
                raise LeaseLostError(f"snapshot lease of {self.holder} was lost: {self._lost}")
            try:
                self.revision = await retry_no_responders(
                    lambda: self.kv.update(LEASE_KEY, self._value(), last=self.revision)
                )
            except nats.js.errors.KeyWrongLastSequenceError as exc:
                self._lost = exc
                raise LeaseLostError(
                    f"snapshot lease of {self.holder} expired or was taken over; the snapshot was not published"
                ) from exc
            return self.revision

    async def release(self) -> None:
        """Give the lease back so the next saver need not wait for expiry (best effort)."""
        if self._lost is not None or not self.revision:
            return
        try:
            await self.kv.delete(LEASE_KEY, last=self.revision)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            # Harmless: the value ages out after the TTL.
            log.debug("snapshot lease release by %s failed: %r", self.holder, exc)

    async def _renew_forever(self) -> None:
        interval = max(0.2, (await self.ttl_s()) / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew()
            except LeaseLostError:
                return
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                # A transient NATS error: try again soon; the fencing check before publishing
                # decides in the end whether we still hold the lease.
                log.warning("snapshot lease renewal failed, retrying: %r", exc)

    async def __aenter__(self) -> "SnapshotLease":
        await self.acquire()
        await self.ttl_s()
        self._renewer = asyncio.create_task(self._renew_forever(), name=f"snapshot-lease-{self.holder}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            try:
                await self._renewer
            except (asyncio.CancelledError, SnapshotError):
                pass
        await self.release()
