"""A JetStream peer that is offline for a moment is waited for, not reported as a failure.

Real 3-server JetStream cluster. CI failed once on "cannot open snapshot bucket …: no suitable
peers for placement, peer offline": under load a server missed its heartbeats and the meta
leader placed no R3 bucket until it was back. The same happens when a server restarts.
"""

from __future__ import annotations

import asyncio

import nats
import pytest

from marmot_appliance.replication.streams import wait_for_stream_leader
from marmot_appliance.snapshots.store import SnapshotStore
from tests.harness import add_stream

ROUNDS = 6


@pytest.mark.timeout(300)
async def test_an_r3_bucket_opens_right_after_a_server_restart(nats_cluster):
    """Timing-dependent: for ~100 ms after a server restarts, the meta leader refuses to place an
    R3 stream ("no suitable peers for placement, peer offline", 400/10005); ROUNDS restarts, each
    followed at once by opening a new bucket, caught it in every run before the fix."""
    nc = await nats.connect(servers=nats_cluster.urls[:2])
    js = nc.jetstream(timeout=10)
    third = nats_cluster.processes[2]
    try:
        for round_ in range(ROUNDS):
            await asyncio.to_thread(third.stop)
            await asyncio.to_thread(third.start)
            store = await SnapshotStore.open(js, f"settling-{round_}", replicas=3)
            assert (await js.stream_info(store.stream)).config.num_replicas == 3
    finally:
        if third.process is None or third.process.poll() is not None:
            await asyncio.to_thread(third.start)
        await nc.close()


@pytest.mark.timeout(300)
async def test_waiting_for_a_stream_leader_outlasts_a_cluster_without_quorum(nats_cluster):
    """CI failed once in wait_for_stream_leader itself: while a replicated stream has no leader
    (an election under load), STREAM.INFO gets no answer and the request timed out, which ended
    the wait with an error instead of waiting on. Two of three servers stopped make that state
    for certain: the wait must report False at its own deadline, then True once they are back."""
    setup = await nats.connect(servers=nats_cluster.urls)
    try:
        setup_js = setup.jetstream(timeout=10)
        await add_stream(setup_js, name="no-quorum", subjects=["no-quorum.>"], num_replicas=3)
        assert await wait_for_stream_leader(setup_js, "no-quorum", 30.0)
        leader = (await setup_js.stream_info("no-quorum")).cluster.leader
    finally:
        await setup.close()
    # Stop the stream's leader and one follower: the survivor has no leader to answer for it.
    names = [cfg.server_name for cfg in nats_cluster.configs]
    survivor = next(i for i, name in enumerate(names) if name != leader)
    others = [proc for i, proc in enumerate(nats_cluster.processes) if i != survivor]
    nc = await nats.connect(servers=[nats_cluster.urls[survivor]])
    js = nc.jetstream(timeout=1)
    try:
        for proc in others:
            await asyncio.to_thread(proc.stop)
        assert await wait_for_stream_leader(js, "no-quorum", 3.0) is False
        for proc in others:
            await asyncio.to_thread(proc.start)
        assert await wait_for_stream_leader(js, "no-quorum", 60.0)
    finally:
        for proc in others:
            if proc.process is None or proc.process.poll() is not None:
                await asyncio.to_thread(proc.start)
        await nc.close()
