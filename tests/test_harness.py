"""The NATS harness itself: a real 3-server JetStream cluster, an R3 stream, clean teardown."""

from __future__ import annotations

import asyncio
import os

import nats

from tests.harness import NatsCluster, add_stream


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not a running server; the harness reaps its children, so this stays exact.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_r3_stream_publish_consume_and_teardown(tmp_path):
    cluster = NatsCluster(root=tmp_path)
    try:
        cluster.start(3)
        pids = cluster.pids
        assert len(pids) == 3 and all(_alive(pid) for pid in pids)
        nc = await nats.connect(servers=cluster.urls, connect_timeout=5)
        try:
            js = nc.jetstream(timeout=10)
            await add_stream(js, name="harness-r3", subjects=["harness.r3"], num_replicas=3)
            info = await js.stream_info("harness-r3")
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
            for i in range(10):
                ack = await js.publish("harness.r3", f"m{i}".encode(), timeout=10)
                assert ack.seq == i + 1
            sub = await js.subscribe("harness.r3", ordered_consumer=True)
            got = [(await sub.next_msg(timeout=5)).data.decode() for _ in range(10)]
            assert got == [f"m{i}" for i in range(10)]
        finally:
            await nc.drain()
    finally:
        cluster.stop()
    await asyncio.sleep(0)
    assert not any(_alive(pid) for pid in pids)


def test_cluster_fixture_yields_three_servers(nats_cluster):
    assert len(nats_cluster.urls) == 3
