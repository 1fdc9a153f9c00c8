"""Repair on the node that holds the right copy: re-publish rows with their ORIGINAL version.

The chosen node reads each key's row image (or its tombstone) and its (version, origin) in one
read transaction, checks the version is still the one the caller judged by (a newer write
since then settles the key by itself: skipped), and publishes the rows to their shard streams
as an ordinary change batch. Every row keeps its original version and origin; the batch's own
origin is the re-publishing node. So:

- every receiver applies it with the ordinary last-writer-wins rule: a node holding an older
  version (or none) takes the row; a node holding the same (version, origin) rewrites the row
  image (the applier applies a row whose (version, origin) its versions table names, equal
  included), which settles "same version, different rows"; a node with a newer version
  ignores it. Idempotent, safe to run twice, safe under writes.
- a key whose version lies at or below a receiver's tombstone horizon (the applier drops such
  rows as stale once tombstones are collected, docs/capture.md) is sent as a new write of the
  same image instead: a fresh version of this node, above every horizon;
- the original writer is not the batch's origin (unless it re-publishes itself), so its
  applier does not skip the rows as its own (replication/own_origin_horizon.py).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from marmot_appliance.natsd.permissions import origin_subject
from marmot_appliance.replication import codec
from marmot_appliance.replication.sharding import shard_for
from marmot_appliance.replication.types import ChangeBatch, RowChange
from marmot_appliance.verify.protocol import VerifyProtocolError
from marmot_appliance.verify.table_state import KeyState

ROWS_PER_MESSAGE = 200
PUBLISH_TIMEOUT_S = 10.0


def fresh_version(clock: int, floor: int) -> int:
    """A version above this node's clock, the wall clock and every receiver's tombstone horizon."""
    return max(int(time.time() * 1000) << 16, clock + 1, floor + 1)


def repair_rows(table: str, columns: list[str], primary_key: list[str], states: list[KeyState],
                expected: list[tuple[int, int]], fresh: list[bool] | None = None,
                fresh_as: tuple[int, int] | None = None) -> tuple[list[RowChange], int, int]:
    """(rows to publish, keys skipped because their version moved on, keys with no image to send).

    A key flagged in `fresh` is sent as (fresh_as = (version, this node's id)) instead of its
    original version: its original version lies at or below a receiver's tombstone horizon,
    where the applier drops it as stale (docs/capture.md), so only a new write of the same image
    can reach that receiver.
    """
    rows: list[RowChange] = []
    moved = missing = 0
    flags = fresh or [False] * len(states)
    for state, want, renew in zip(states, expected, flags):
        if (state.version, state.origin) != tuple(want):
            moved += 1
            continue
        version, origin = fresh_as if (renew and fresh_as) else (state.version, state.origin)
        if state.deleted:
            if state.row is not None:
                missing += 1  # deleted by its version yet present here: not a clean tombstone to send
                continue
            rows.append(RowChange(table, "delete", state.key, tuple(primary_key), state.key, version, origin))
        elif state.row is not None:
            values = tuple(state.row[col] for col in columns)
            rows.append(RowChange(table, "upsert", state.key, tuple(columns), values, version, origin))
        else:
            missing += 1
    return rows, moved, missing


async def publish_repair(js: Any, replication: Any, node_id: int, max_payload: int, fingerprint: str | None,
                         table: str, primary_key: list[str], rows: list[RowChange]) -> int:
    """Publish rows per shard in bounded batches; returns messages acknowledged."""
    by_shard: dict[int, list[RowChange]] = {}
    for row in rows:
        by_shard.setdefault(shard_for(table, row.pk, replication.shards), []).append(row)
    sent = 0
    for shard, shard_rows in sorted(by_shard.items()):
        for start in range(0, len(shard_rows), ROWS_PER_MESSAGE):
            chunk = tuple(shard_rows[start:start + ROWS_PER_MESSAGE])
            batch = ChangeBatch(origin=node_id, rows=chunk, fingerprints={table: fingerprint} if fingerprint else {},
                                primary_keys={table: tuple(primary_key)})
            payload = codec.encode_batch(batch, replication.compression)
            if len(payload) > max_payload - 4096:
                raise VerifyProtocolError(f"a repair message for {table!r} is too large; repair fewer keys at once")
            msg_id = f"repair-{node_id}-{hashlib.sha256(payload).hexdigest()[:40]}"
            # Our own origin token, as for every change we publish (docs/security.md).
            await js.publish(origin_subject(replication, shard, node_id), payload, timeout=PUBLISH_TIMEOUT_S,
                             headers={codec.ORIGIN_HEADER: str(node_id), codec.MSG_ID_HEADER: msg_id})
            sent += 1
    return sent
