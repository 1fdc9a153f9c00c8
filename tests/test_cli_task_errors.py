"""A command never ends with a traceback from one of nats-py's own background tasks.

The chaos harness saw `snapshot save` print "Task exception was never retrieved ... Client.
_attempt_reconnect ... InvalidStateError" after its one-line error, when every nats-server was
killed while the command closed its connection: asyncio's default handler printed the library
task's error at exit. Commands now install nats_client.quiet_client_task_errors on their loop.
The task here is a real nats-py coroutine failing the same way (a client that was never
connected has no reconnect state).
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client

from marmot_appliance.nats_client import quiet_client_task_errors


async def _failed_task(coro) -> asyncio.Task:
    task = asyncio.ensure_future(coro)
    await asyncio.wait([task])
    assert task.exception() is not None
    return task


def test_a_nats_client_task_error_is_not_printed(caplog):
    async def scenario():
        task = await _failed_task(Client()._attempt_reconnect())
        loop = asyncio.get_running_loop()
        with caplog.at_level(logging.DEBUG):
            quiet_client_task_errors(loop, {"message": "Task exception was never retrieved",
                                            "exception": task.exception(), "future": task})

    asyncio.run(scenario())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert any("nats client task" in r.getMessage() for r in caplog.records)


def test_any_other_task_error_still_reaches_asyncio(caplog):
    async def boom():
        raise RuntimeError("ours")

    async def scenario():
        task = await _failed_task(boom())
        quiet_client_task_errors(asyncio.get_running_loop(), {
            "message": "Task exception was never retrieved", "exception": task.exception(), "future": task})

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(scenario())
    assert any("never retrieved" in r.getMessage() for r in caplog.records)
