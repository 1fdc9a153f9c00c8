"""Back-off between retries, and waiting that a stop event cuts short.

One formula for every retry loop (NATS connect, publish, consume, apply, JetStream settling,
snapshot requests), each call site keeping its own numbers.
"""

from __future__ import annotations

import asyncio
import random

# Without a cap of its own, the exponent stops here: 2**62 times any initial delay is far past
# any max_s, and the int stays small enough to convert to a float (2**1100 would not).
_EXPONENT_LIMIT = 62


def backoff_delay(attempt: int, initial_s: float, max_s: float, max_exponent: int = _EXPONENT_LIMIT) -> float:
    """`initial_s * 2**attempt`, the exponent capped at `max_exponent`, the result at `max_s`."""
    return min(max_s, initial_s * 2 ** min(attempt, max_exponent, _EXPONENT_LIMIT))


def jittered(delay_s: float) -> float:
    """50-100 % of `delay_s`, so nodes recovering together do not retry in step."""
    return delay_s * (0.5 + random.random() / 2)


async def sleep_or_stop(stop: asyncio.Event | None, seconds: float) -> bool:
    """Sleep `seconds`, or less if `stop` is set meanwhile. True when `stop` was set.

    With no event, a plain sleep (False).
    """
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
    # Also True when `stop` was set just as the time ran out: callers asked "stop now?".
    return stop.is_set()
