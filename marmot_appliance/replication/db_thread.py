"""One dedicated thread per SQLite connection, driven from asyncio.

A write can wait on `busy_timeout`; running each component's connection in its own single
worker thread keeps the event loop (NATS heartbeats, acks, /health) responsive, and one worker
per connection means its calls never overlap. The connections are still opened with
`check_same_thread=False` (replication/sqlite_util) because one can be made on one thread and
used on another (the capture's retire connection is opened on the capture thread and used on the
retire thread): these threads, not sqlite3's check, keep one caller per connection at a time.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class DbThread:
    """Runs callables one at a time on a single named thread."""

    def __init__(self, name: str):
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs) if kwargs else (lambda: fn(*args))
        return await loop.run_in_executor(self._executor, call)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """For setup and teardown outside the event loop."""
        return self._executor.submit(fn, *args).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
