"""Snapshot restores inside a running node: nothing applies or publishes while the file is replaced.

A restore replaces the whole database file, positions included. Anything still applying at that
moment would write rows and a position from before the restore into the restored file, and the
entries in between would never be replayed (issue 10, case 1: rows lost on the other shards). So
a restore here is one coordinated step:

  1. *pending*: a consumer found a gap (`request_restore`) or found the file replaced underneath
     (`request_adopt`); that consumer already holds. From now on no snapshot is saved by this
     node (`saving_blocked`), and the save lock waits for a save in progress to finish;
  2. the publisher and every shard consumer are stopped (each finishes the batch it is applying;
     a straggler past the timeout is cancelled, and the applier's position fence turns whatever
     it still commits into a no-op);
  3. the snapshot is restored (local changes published first), or, for an adoption, nothing;
  4. capture is re-installed, the applier adopts the file's new epoch, and every consumer and the
     publisher start again from the positions the file now holds.

The maintenance loop skips its work while a restore is pending or running (`busy`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from marmot_appliance.errors import MarmotError

log = logging.getLogger(__name__)

# A restore that failed is not tried again for the same stream before this long; meanwhile the
# consumer falls back to what it does without a snapshot.
RETRY_AFTER_FAILURE_S = 30.0


@dataclass
class RestoreState:
    """What /health shows under "restore"."""

    state: str = "idle"  # "idle" | "pending" | "restoring"
    reason: str | None = None
    restores: int = 0  # snapshots restored while running
    adoptions: int = 0  # database replacements adopted without a snapshot download
    last_error: str | None = None

    def as_health(self) -> dict:
        return {
            "state": self.state,
            "reason": self.reason,
            "restores": self.restores,
            "adoptions": self.adoptions,
            "last_error": self.last_error,
        }


class RestoreCoordinator:
    """Owned by the runtime; `run(stop)` is one of its tasks."""

    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.state = RestoreState()
        # Held by a snapshot save and by a restore: neither runs while the other does.
        self.save_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._restore_wanted = False
        self._adopt_wanted = False
        self._failed_at: dict[str, float] = {}  # stream -> monotonic time of the last failed restore
        self._requesting_streams: set[str] = set()

    # -- requests (from consumers) ----------------------------------------------------------

    def request_restore(self, stream: str, reason: str) -> bool:
        """A consumer found a gap. True: a restore will run (the consumer must hold)."""
        failed_at = self._failed_at.get(stream)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER_FAILURE_S:
            return False
        self._restore_wanted = True
        self._requesting_streams.add(stream)
        self._mark_pending(reason)
        return True

    def request_adopt(self, stream: str) -> None:
        """A consumer's write was fenced: the file was replaced underneath; adopt it."""
        self._adopt_wanted = True
        self._mark_pending(f"stream {stream}: the database file was replaced underneath the node")

    def _mark_pending(self, reason: str) -> None:
        if self.state.state == "idle":
            self.state.state = "pending"
            self.state.reason = reason
        self._report()
        self._wake.set()

    @property
    def busy(self) -> bool:
        return self.state.state != "idle"

    def saving_blocked(self) -> str | None:
        """Why this node must not save a snapshot now, or None."""
        if self.busy:
            return f"a snapshot restore is {self.state.state} on this node ({self.state.reason})"
        return None

    # -- the task ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if stop.is_set():
                return
            self._wake.clear()
            if self._restore_wanted or self._adopt_wanted:
                await self._replace_database(stop)

    async def _replace_database(self, stop: asyncio.Event) -> None:
        runtime = self.runtime
        async with self.save_lock:
            self.state.state = "restoring"
            self._report()
            await runtime.pause_flow()
            streams, self._requesting_streams = self._requesting_streams, set()
            want_restore, self._restore_wanted = self._restore_wanted, False
            self._adopt_wanted = False
            try:
                if want_restore:
                    await self._restore(streams)
                else:
                    log.warning("the database file was replaced underneath this node; adopting it")
                    await runtime.adopt_database()
                    self.state.adoptions += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the node must resume either way; reported
                # The file may be the old one or (if a later step failed) the restored one:
                # adopting it is right in both cases, and the consumers re-check their gaps.
                self.state.last_error = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, MarmotError):
                    log.error("snapshot restore failed: %s", exc, exc_info=exc)
                try:
                    await runtime.adopt_database()
                except Exception as adopt_exc:  # noqa: BLE001 - reported; the part failure stops the node
                    log.error("cannot adopt the database after a failed restore: %s", adopt_exc)
                    raise
            finally:
                if self._restore_wanted or self._adopt_wanted:
                    self.state.state = "pending"  # asked for again meanwhile: the next round runs it
                else:
                    self.state.state = "idle"
                    self.state.reason = None
                self._report()
                if not stop.is_set():
                    await runtime.resume_flow()

    async def _restore(self, streams: set[str]) -> None:
        runtime = self.runtime
        try:
            restored = await runtime.restore_database()
        except MarmotError as exc:
            now = time.monotonic()
            for stream in streams:
                self._failed_at[stream] = now
            runtime.metrics.inc("errors", kind="restore")
            log.error("cannot restore a snapshot (%s): %s", ", ".join(sorted(streams)) or "?", exc)
            raise
        if restored:
            self.state.restores += 1
            self.state.last_error = None
            runtime.metrics.inc("snapshot_restores")
        for stream in streams:
            self._failed_at.pop(stream, None)

    def _report(self) -> None:
        # /health says "restoring" (503) from the request on: the consumers hold or are paused.
        running = "running" if self.state.state == "restoring" else "pending"
        self.runtime.status.restoring = (
            None if self.state.state == "idle" else f"snapshot restore {running}: {self.state.reason or '-'}"
        )
        self.runtime.metrics.set(
            "snapshot_restore_in_progress", 0 if self.state.state == "idle" else 1,
        )
