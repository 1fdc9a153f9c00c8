"""Wake the publisher when some process commits to the database, without a busy loop.

Two signals, both cheap:

* inotify (Linux, through libc via ctypes: no dependency) on the database's directory, filtered
  to the database file and its `-wal`: a commit in WAL mode always writes the `-wal` file, so an
  IN_MODIFY arrives within microseconds of the commit. The directory is watched rather than the
  `-wal` file itself because SQLite deletes and recreates `-wal` when the last connection closes.
* `PRAGMA data_version` on a private connection: it changes exactly when another connection
  committed. It is polled at a short interval only when inotify is unavailable, and at the slow
  fallback interval always (a safety net for filesystems where inotify misses writes, e.g. NFS).

`CommitWakeup.wait(timeout)` returns when either fired or the timeout passed.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import sqlite3
import struct
from pathlib import Path

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len

# Without inotify, data_version is polled this often: cheap (no I/O beyond the shm header).
DATA_VERSION_POLL_S = 0.005


class InotifyWatch:
    """A non-blocking inotify descriptor watching one directory for writes to chosen names."""

    def __init__(self, directory: Path, names: set[str]):
        libc_name = ctypes.util.find_library("c")
        if not libc_name:
            raise OSError("libc not found")
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            raise OSError("inotify is not available on this platform")
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        mask = IN_MODIFY | IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO
        wd = libc.inotify_add_watch(fd, os.fsencode(directory), mask)
        if wd < 0:
            errno = ctypes.get_errno()
            os.close(fd)
            raise OSError(errno, f"inotify_add_watch({directory}) failed")
        self.fd = fd
        self._names = {os.fsencode(name) for name in names}

    def drain(self) -> bool:
        """Read every queued event; True if one concerned a watched name."""
        hit = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return hit
            if not data:
                return hit
            offset = 0
            while offset + _EVENT_HEADER.size <= len(data):
                _wd, _mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
                name = data[offset + _EVENT_HEADER.size : offset + _EVENT_HEADER.size + length].rstrip(b"\0")
                offset += _EVENT_HEADER.size + length
                if name in self._names:
                    hit = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CommitWakeup:
    """Fires on commits to one database. Start it inside the running event loop."""

    def __init__(self, db_path: str | Path, fallback_interval_s: float, use_inotify: bool = True):
        self.db_path = Path(db_path)
        self.fallback_interval_s = fallback_interval_s
        self._use_inotify = use_inotify
        self._event = asyncio.Event()
        self._watch: InotifyWatch | None = None
        self._conn: sqlite3.Connection | None = None
        self._last_data_version: int | None = None
        self._poll_task: asyncio.Task[None] | None = None

    @property
    def mode(self) -> str:
        return "inotify" if self._watch else "data_version"

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._use_inotify:
            try:
                self._watch = InotifyWatch(self.db_path.parent, {self.db_path.name, self.db_path.name + "-wal"})
                loop.add_reader(self._watch.fd, self._on_inotify)
            except OSError as exc:
                log.info("inotify unavailable (%s); polling PRAGMA data_version instead", exc)
                self._watch = None
        self._conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self._last_data_version = self._data_version()
        self._poll_task = asyncio.create_task(self._poll_loop(), name="commit-wakeup-poll")

    def _on_inotify(self) -> None:
        if self._watch is not None and self._watch.drain():
            self._event.set()

    def _data_version(self) -> int | None:
        try:
            assert self._conn is not None
            version: int = self._conn.execute("PRAGMA data_version").fetchone()[0]
            return version
        except sqlite3.Error:
            return None

    async def _poll_loop(self) -> None:
        interval = self.fallback_interval_s if self._watch else min(DATA_VERSION_POLL_S, self.fallback_interval_s)
        while True:
            await asyncio.sleep(interval)
            version = self._data_version()
            if version != self._last_data_version:
                self._last_data_version = version
                self._event.set()
            elif self._watch is not None:
                # Safety net: inotify may miss writes (network filesystems); wake anyway.
                self._event.set()

    def notify(self) -> None:
        """Wake the waiter now (used at shutdown and after schema changes)."""
        self._event.set()

    async def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for a commit signal; True if one arrived, False on timeout."""
        try:
            if timeout_s is None:
                await self._event.wait()
            else:
                await asyncio.wait_for(self._event.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        finally:
            self._event.clear()
        return True

    async def close(self) -> None:
        if self._poll_task:
            self._poll_task.cancel()
            try:
                await self._poll_task
            except asyncio.CancelledError:
                pass
        if self._watch is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._watch.fd)
            except (RuntimeError, ValueError):
                pass
            self._watch.close()
            self._watch = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
