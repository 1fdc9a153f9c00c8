"""A JetStream peer that is offline for a moment is waited for, not reported as a failure.

Real 3-server JetStream cluster. CI failed once on "cannot open snapshot bucket …: no suitable
peers for placement, peer offline": under load a server missed its heartbeats and the meta
leader placed no R3 bucket until it was back. The same happens when a server restarts.
"""

from __future__ import annotations

import asyncio

import nats
import pytest

from marmot_appliance.snapshots.store import SnapshotStore

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
