"""Who works on a database file: an exclusive lock beside it, held by the node runtime and by `snapshot restore`.

`snapshot restore` replaces the whole file; a node running on it at the same time would keep
applying into the restored file from its old positions (rows lost, issue 10 case 18). So both take
an exclusive `flock` on `<db>.marmot-lock` for as long as they work on the file, and the second
one is refused with a message naming the first.

Why flock: the kernel drops the lock when the holding process exits, however it exits (SIGKILL,
a crash, a power cut reboot), so a stale lock never blocks anyone; the file left behind is just
a file. Two nodes on one database are refused the same way. The lock file also holds the
holder's pid and role, for the message only (it is never trusted to decide anything).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from marmot_appliance.errors import MarmotError

LOCK_SUFFIX = ".marmot-lock"


class DatabaseInUseError(MarmotError):
    """Another process (a running node, or a `snapshot restore`) works on this database."""


def lock_path(db_path: str | Path) -> Path:
    path = Path(db_path)
    return path.with_name(path.name + LOCK_SUFFIX)


class DatabaseLock:
    """`with DatabaseLock(db, "node n1"):` or acquire()/release(); refuses at once, never waits."""

    def __init__(self, db_path: str | Path, role: str):
        self.db_path = Path(db_path)
        self.role = role
        self.path = lock_path(db_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise MarmotError(f"cannot create the lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DatabaseInUseError(
                f"database {self.db_path} is in use by {holder}; "
                + ("stop the node first (a running node restores snapshots by itself when it must)"
                   if "node" in holder else "wait until it has finished")
            ) from None
        except OSError as exc:
            os.close(fd)
            raise MarmotError(f"cannot lock {self.path}: {exc.strerror}") from exc
        record = {"pid": os.getpid(), "role": self.role, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> "DatabaseLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"{info.get('role', 'another process')} (pid {int(info['pid'])})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another marmot-appliance process"
