"""retry.py: the shared back-off formula gives every call site the delays it had before."""

from __future__ import annotations

import asyncio
import math

import pytest

from marmot_appliance.errors import MarmotError, TransientError
from marmot_appliance.replication.consumer_errors import is_transient
from marmot_appliance.replication.sqlite_util import DatabaseBusyError
from marmot_appliance.retry import backoff_delay, jittered, sleep_or_stop

ATTEMPTS = range(0, 80)


def test_nats_connect_delays_are_the_old_ones():
    for attempt in ATTEMPTS:
        assert backoff_delay(attempt, 0.2, 5.0, max_exponent=5) == min(5.0, 0.2 * 2 ** min(attempt, 5))


def test_publisher_and_consumer_delays_are_the_old_ones():
    for attempt in ATTEMPTS:
        assert backoff_delay(attempt, 0.05, 5.0, max_exponent=10) == min(5.0, 0.05 * 2 ** min(attempt, 10))
        assert backoff_delay(attempt, 0.02, 5.0, max_exponent=10) == min(5.0, 0.02 * (1 << min(attempt, 10)))


def test_snapshot_no_responder_delays_are_the_old_ones():
    for attempt in range(6):
        assert backoff_delay(attempt, 0.1, math.inf) == 0.1 * 2**attempt


def test_settling_delays_are_the_old_doubling_sequence():
    delay = 0.2
    for attempt in ATTEMPTS:
        assert backoff_delay(attempt, 0.2, 5.0) == delay
        delay = min(delay * 2, 5.0)


def test_a_huge_attempt_count_does_not_overflow():
    assert backoff_delay(10_000, 0.2, 5.0) == 5.0


def test_jitter_keeps_half_to_all_of_the_delay():
    for _ in range(1000):
        assert 2.5 <= jittered(5.0) <= 5.0


async def test_sleep_or_stop_tells_a_stop_from_a_timeout():
    stop = asyncio.Event()
    assert await sleep_or_stop(stop, 0.01) is False
    assert await sleep_or_stop(None, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, stop.set)
    started = asyncio.get_running_loop().time()
    assert await sleep_or_stop(stop, 30.0) is True
    assert asyncio.get_running_loop().time() - started < 5.0


@pytest.mark.parametrize("error, transient", [
    (DatabaseBusyError("locked"), True),
    (TransientError("anything passing"), True),
    (MarmotError("a user's mistake"), False),
])
def test_transience_is_the_transient_error_class(error, transient):
    assert is_transient(error) is transient
