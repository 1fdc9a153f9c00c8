"""Save a snapshot: consistent copy -> upload -> verify -> publish the manifest, under the lease.

Order matters for readers: the object is complete and verified before the manifest names it,
and the manifest is a compare-and-set, so `restore` only ever sees complete snapshots. Objects
that fall out of `keep` are deleted after the new manifest is published, never before.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from nats.js import JetStreamContext

from marmot_appliance.replication.sharding import shard_numbers
from marmot_appliance.snapshots.dbcopy import consistent_copy
from marmot_appliance.snapshots.errors import SnapshotBehind, SnapshotUpToDate
from marmot_appliance.snapshots.lease import SnapshotLease
from marmot_appliance.snapshots.local_state import open_readonly, read_positions
from marmot_appliance.snapshots.manifest import SnapshotInfo
from marmot_appliance.snapshots.progress import finish_progress, progress_for
from marmot_appliance.snapshots.selection import describe_tables
from marmot_appliance.snapshots.store import DEFAULT_LEASE_TTL_S, SnapshotStore
from marmot_appliance.spec.model import Cluster, Node

log = logging.getLogger(__name__)


def stream_names(cluster: Cluster) -> list[str]:
    return [cluster.replication.stream_name(shard) for shard in shard_numbers(cluster.replication.shards)]


def snapshot_replicas(cluster: Cluster) -> int:
    return cluster.snapshots.replicas or cluster.effective_log_replicas


async def open_store(
    js: JetStreamContext, cluster: Cluster, create: bool = True, lease_ttl_s: float = DEFAULT_LEASE_TTL_S
) -> SnapshotStore:
    return await SnapshotStore.open(
        js, cluster.snapshot_bucket, snapshot_replicas(cluster), create=create, lease_ttl_s=lease_ttl_s
    )


def scratch_dir(db_path: Path, work_dir: Path | None) -> Path:
    """Temp files go beside the database by default: same disk, and never a RAM-backed /tmp."""
    base = work_dir or db_path.resolve().parent
    return Path(tempfile.mkdtemp(prefix=".marmot-snapshot-", dir=base))


def local_positions(db_path: Path) -> dict[str, int]:
    conn = open_readonly(db_path)
    try:
        return read_positions(conn)
    finally:
        conn.close()


async def save_snapshot(
    js: JetStreamContext,
    cluster: Cluster,
    node: Node,
    db_path: str | Path,
    *,
    force: bool = False,
    show_progress: bool | None = False,
    work_dir: Path | None = None,
    store: SnapshotStore | None = None,
) -> SnapshotInfo:
    """Save this node's database as the cluster's newest snapshot.

    Raises SnapshotBusyError when another node is saving (only one saves at a time),
    SnapshotUpToDate when the newest snapshot already reflects every position this node has
    applied (unless `force`), and SnapshotBehind when this node is behind the newest snapshot on
    some stream (even with `force`). All are `SnapshotSkipped`: nothing was changed.
    `show_progress`: None = a meter when stderr is a terminal, False = silent.
    """
    db_path = Path(db_path)
    store = store or await open_store(js, cluster)
    streams = stream_names(cluster)
    async with SnapshotLease(store.lease_kv, node.name) as lease:
        manifest, revision = await store.read_manifest()
        newest = manifest.newest
        if newest is not None:
            positions = await asyncio.to_thread(local_positions, db_path)
            _refuse_if_behind(newest, positions, streams, node.name)
            if not force and newest.covers(positions):
                raise SnapshotUpToDate(
                    f"the newest snapshot ({newest.name}) already reflects every position this node has "
                    "applied; nothing to save (use --force to save anyway)"
                )
        scratch = scratch_dir(db_path, work_dir)
        try:
            copy_path = scratch / "snapshot.db"
            positions = await asyncio.to_thread(consistent_copy, db_path, copy_path)
            if newest is not None:  # the file may have moved since the check above (a restore)
                _refuse_if_behind(newest, positions, streams, node.name)
            tables = await asyncio.to_thread(describe_tables, copy_path, node.tables)
            generation = manifest.next_generation
            name = f"snapshot-{generation:08d}-{node.name}-{uuid.uuid4().hex[:8]}.db"
            progress = progress_for(f"uploading {name}", copy_path.stat().st_size, show_progress)
            size, sha = await store.upload(copy_path, name, progress)
            finish_progress(progress)
            info = SnapshotInfo(
                name=name,
                sha256=sha,
                size=size,
                created=time.time(),
                node=node.name,
                node_id=node.id,
                generation=generation,
                positions=positions,
                selection=tables.selection,
                tables=tables.replicated,
                local_tables=tables.local,
            )
            try:
                await store.verify_uploaded(name, size, sha)
                await lease.renew()  # fencing: still ours right before we publish
                new_manifest, dropped = manifest.with_new(info, cluster.snapshots.keep)
                await store.publish_manifest(new_manifest, revision)
            except BaseException:
                # Never leave an object the manifest does not name (fencing failed, conflict...).
                await _delete_quietly(store, name)
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        await _collect_garbage(store, {s.name for s in new_manifest.snapshots}, [s.name for s in dropped])
    log.info(
        "saved snapshot %s (%d bytes, positions %s)", info.name, info.size, info.positions or "{}"
    )
    return info


def _refuse_if_behind(newest: SnapshotInfo, positions: dict[str, int], streams: list[str], node: str) -> None:
    """A snapshot behind the newest on any stream would become the newest and push a better one
    out of `keep`; a node restoring it would find entries gone (issue 10, case 13)."""
    behind = {s: seqs for s, seqs in newest.behind(positions).items() if s in streams}
    if behind:
        detail = ", ".join(f"{s} at {mine} < {theirs}" for s, (mine, theirs) in sorted(behind.items()))
        raise SnapshotBehind(
            f"node {node} is behind the newest snapshot ({newest.name}) on {detail}; "
            "not saving (a snapshot is saved only by a node at or past the newest one on every stream)"
        )


async def _delete_quietly(store: SnapshotStore, name: str) -> None:
    try:
        await store.delete_object(name)
    except Exception as exc:  # the original error matters more; the orphan is collected later
        log.warning("could not delete unpublished snapshot object %s: %r", name, exc)


async def _collect_garbage(store: SnapshotStore, kept: set[str], dropped: list[str]) -> None:
    """Delete snapshots that fell out of `keep`, and orphans of interrupted saves."""
    try:
        names = set(await store.object_names()) | set(dropped)
    except Exception as exc:
        log.warning("could not list snapshot objects for cleanup: %r", exc)
        names = set(dropped)
    for name in sorted(names - kept):
        await _delete_quietly(store, name)
