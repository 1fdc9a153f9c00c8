"""Asking the cluster for a snapshot: how a node with a gap gets one without an operator.

A node whose stream lost entries it never applied (retention) needs a snapshot that reflects at
least `first_seq - 1` on that stream. When none of the kept snapshots does, it writes what it
needs into the snapshot index bucket (`<bucket>-index`, key `save-request`), one entry per
requesting node:

    {"requests": {"n3": {"required": {"marmot-changes-1": 1234}, "at": 1764600000.0}}}

Every node's snapshot scheduler reads the key at each check; a node whose own applied positions
cover a request that the newest snapshot does not cover saves a snapshot (under the usual lease,
so one saves at a time). The requester's consumer looks again every few seconds and restores it.
Requests a newer snapshot covers are ignored; a requester withdraws its entry once its gap is
closed. The key is written with compare-and-set, so concurrent requesters never lose each other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import nats.js.errors

from marmot_appliance.snapshots.manifest import SnapshotInfo
from marmot_appliance.snapshots.store import SnapshotStore, retry_no_responders

log = logging.getLogger(__name__)

REQUEST_KEY = "save-request"
CAS_ATTEMPTS = 5

# node name -> {"required": {stream: seq}, "at": unix time}, as read from JSON (not validated)
Requests = dict[str, dict[str, Any]]


async def read_requests(store: SnapshotStore) -> tuple[Requests, int]:
    """(node name -> {"required": {stream: seq}, "at": unix time}, KV revision; 0 when none)."""
    try:
        entry = await store.manifest_kv.get(REQUEST_KEY)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return {}, 0
    try:
        requests = json.loads(entry.value or b"{}").get("requests", {})
    except (ValueError, AttributeError):
        log.warning("ignoring an unreadable snapshot request entry (revision %s)", entry.revision)
        requests = {}
    if not isinstance(requests, dict):
        requests = {}
    return requests, int(entry.revision or 0)


async def _write(store: SnapshotStore, requests: Requests, revision: int) -> None:
    value = json.dumps({"requests": requests}, sort_keys=True).encode()
    if revision == 0:
        await retry_no_responders(lambda: store.manifest_kv.create(REQUEST_KEY, value))
    else:
        await retry_no_responders(lambda: store.manifest_kv.update(REQUEST_KEY, value, last=revision))


async def _change(store: SnapshotStore, change: Callable[[Requests], bool]) -> bool:
    """Apply `change(requests) -> bool (changed?)` with compare-and-set; True when written."""
    for attempt in range(CAS_ATTEMPTS):
        requests, revision = await read_requests(store)
        if not change(requests):
            return False
        try:
            await _write(store, requests, revision)
            return True
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            # Someone else wrote in between (nats-py's `create` reports a conflict whose re-read
            # misses the key as KeyNotFoundError): read again.
            await asyncio.sleep(0.05 * (attempt + 1))
            continue
    raise nats.js.errors.KeyWrongLastSequenceError()


async def request_snapshot(store: SnapshotStore, node_name: str, required: dict[str, int]) -> bool:
    """Ask for a snapshot reflecting at least `required`; True when the request was (re)written."""
    wanted = {stream: int(seq) for stream, seq in required.items()}

    def change(requests: Requests) -> bool:
        current = requests.get(node_name) or {}
        if current.get("required") == wanted:
            return False
        requests[node_name] = {"required": wanted, "at": time.time()}
        return True

    written = await _change(store, change)
    if written:
        log.warning("asked the cluster for a snapshot reflecting %s", wanted)
    return written


async def withdraw_request(store: SnapshotStore, node_name: str) -> bool:
    def change(requests: Requests) -> bool:
        return requests.pop(node_name, None) is not None

    return await _change(store, change)


def servable_request(
    requests: Requests, newest: SnapshotInfo | None, local_positions: dict[str, int], own_name: str
) -> str | None:
    """Why this node should save a snapshot for someone else's request, or None.

    A request is served when the newest snapshot does not cover it and this node's positions do.
    """
    for node_name, request in sorted(requests.items()):
        if node_name == own_name or not isinstance(request, dict):
            continue
        try:
            required = {str(stream): int(seq) for stream, seq in (request.get("required") or {}).items()}
        except (TypeError, ValueError):
            continue
        if not required or (newest is not None and newest.covers(required)):
            continue
        if all(local_positions.get(stream, 0) >= seq for stream, seq in required.items()):
            return f"node {node_name} asked for a snapshot reflecting {required}"
    return None
