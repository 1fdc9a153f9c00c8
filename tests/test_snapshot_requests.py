"""Snapshot requests written concurrently from every server of a real 3-server cluster.

CI once saw a node's gap recovery report "cannot reach the snapshot store (nats: key not
found)": the request key's compare-and-set read went to a follower (KV direct gets may be
served by any replica) that did not have the key yet, and nats-py's `create` turned that stale
read into KeyNotFoundError. Reads that back a compare-and-set must be answered by the leader.
The race is timing-dependent, so each round has three writers (one per server) and the test
runs ROUNDS rounds; every request must land, and none may raise.
"""

from __future__ import annotations

import asyncio

import nats

from marmot_appliance.snapshots.requests import read_requests, request_snapshot, withdraw_request
from marmot_appliance.snapshots.store import SnapshotStore

ROUNDS = 60


async def _stores(urls: list[str]):
    connections, stores = [], []
    for url in urls:
        nc = await nats.connect(url)
        connections.append(nc)
        stores.append(await SnapshotStore.open(nc.jetstream(timeout=10), "req-test", replicas=3))
    return connections, stores


def test_compare_and_set_reads_go_to_the_stream_leader(nats_server):
    """The store turns nats-py's direct (any-replica) KV reads off through a private attribute;
    this fails if a nats-py upgrade renames it (the switch would silently stop working)."""

    async def scenario():
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream(timeout=10)
            store = await SnapshotStore.open(js, "leader-test", replicas=1)
            assert "_direct" in vars(await js.key_value("leader-test-index")), "nats-py renamed KeyValue._direct"
            assert store.manifest_kv._direct is False and store.lease_kv._direct is False
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_concurrent_requests_from_every_server_all_land(nats_cluster):
    async def scenario():
        connections, stores = await _stores(nats_cluster.urls)
        try:
            for round_number in range(1, ROUNDS + 1):
                await asyncio.gather(*(
                    request_snapshot(store, f"n{i}", {"marmot-changes-1": round_number})
                    for i, store in enumerate(stores, start=1)
                ))
                requests, _revision = await read_requests(stores[0])
                assert {name: r["required"] for name, r in requests.items()} == {
                    f"n{i}": {"marmot-changes-1": round_number} for i in range(1, 4)
                }, f"round {round_number}"
                if round_number % 3 == 0:
                    await asyncio.gather(*(withdraw_request(store, f"n{i}") for i, store in enumerate(stores, 1)))
        finally:
            for nc in connections:
                await nc.close()

    asyncio.run(scenario())
