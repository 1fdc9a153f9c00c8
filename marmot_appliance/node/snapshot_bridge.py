"""Where the node runtime meets the snapshots package (restore at start, scheduler, save-now).

Kept in one place so the runtime does not depend on the snapshot package's internals; when the
package is missing or does not offer a hook, the runtime runs without it and says so.
"""

from __future__ import annotations

import logging
from typing import Any

from marmot_appliance.errors import MarmotError

log = logging.getLogger(__name__)


def _snapshots_api() -> Any | None:
    try:
        import marmot_appliance.snapshots as snapshots
    except ImportError:
        return None
    return snapshots


async def restore_if_needed(runtime: Any) -> bool:
    """Restore the newest snapshot when a stream was truncated below this node's position.

    Local changes not yet published are flushed first (the snapshot package asks through the
    callback). Raises the snapshot package's errors (e.g. no snapshot closes the gap).
    """
    api = _snapshots_api()
    hook = getattr(api, "restore_if_needed", None) if api else None
    if hook is None:
        log.warning("snapshot restore is not available in this build; a truncated log cannot be recovered")
        return False
    flush = runtime.publisher.flush if runtime.publisher is not None and runtime.node.publish else None
    return bool(await hook(runtime.js, runtime.cluster, runtime.node, str(runtime.config.db_path), flush_pending=flush))


async def restore_would_replace_new_database(runtime: Any) -> bool:
    """True when the start-up restore would replace a never-replicated database (a new node and
    a snapshot exists)."""
    api = _snapshots_api()
    decide = getattr(api, "decide_restore", None) if api else None
    if decide is None:
        return False
    decision = await decide(runtime.js, runtime.cluster, runtime.node, str(runtime.config.db_path))
    return bool(decision.needed and decision.never_replicated)


async def snapshot_needed(runtime: Any, required: dict[str, int]) -> dict[str, int]:
    """What a snapshot must reflect to be restorable here: `required`, and on every stream the
    entry before its first retained one (the restore's own rule, snapshots/restore.py)."""
    from marmot_appliance.snapshots.restore import stream_bounds

    needed = dict(required)
    for stream, (first, _last) in (await stream_bounds(runtime.js, runtime.cluster)).items():
        if first > 1:
            needed[stream] = max(needed.get(stream, 0), first - 1)
    return needed


async def snapshot_covering(runtime: Any, needed: dict[str, int]) -> str | None:
    """The name of a kept snapshot this node may restore that reflects at least `needed`, or None."""
    from marmot_appliance.snapshots.errors import NoSnapshotError
    from marmot_appliance.snapshots.save import open_store

    try:
        store = await open_store(runtime.js, runtime.cluster, create=False)
    except NoSnapshotError:
        return None
    manifest, _revision = await store.read_manifest()
    for info in manifest.snapshots:
        if info.covers(needed) and info.selection_problem(runtime.node.tables.selects) is None:
            return info.name
    return None


async def request_snapshot(runtime: Any, needed: dict[str, int]) -> None:
    """Ask the cluster for a snapshot reflecting `needed` (any node whose positions cover it
    saves one; see snapshots/requests.py)."""
    from marmot_appliance.snapshots.requests import request_snapshot as write_request
    from marmot_appliance.snapshots.save import open_store

    store = await open_store(runtime.js, runtime.cluster)
    await write_request(store, runtime.node.name, needed)


async def withdraw_request(runtime: Any) -> None:
    from marmot_appliance.snapshots.requests import withdraw_request as remove_request
    from marmot_appliance.snapshots.save import open_store

    store = await open_store(runtime.js, runtime.cluster)
    await remove_request(store, runtime.node.name)


def start_scheduler(runtime: Any) -> Any | None:
    """The snapshot scheduler as a task of the runtime (stopped with the other parts)."""
    import asyncio

    api = _snapshots_api()
    scheduler_class = getattr(api, "SnapshotScheduler", None) if api else None
    if scheduler_class is None:
        return None
    scheduler = scheduler_class(
        runtime.js, runtime.cluster, runtime.node, str(runtime.config.db_path), runtime.metrics,
        save_lock=runtime.restores.save_lock, saving_blocked=runtime.saving_blocked,
    )
    if not getattr(scheduler, "enabled", True):
        return None
    scheduler.task = asyncio.create_task(scheduler.run(runtime.parts_stop), name="snapshot-scheduler")
    return scheduler


async def save_snapshot_now(runtime: Any) -> None:
    """`--save-snapshot`: save this node's database as the newest snapshot, then exit."""
    api = _snapshots_api()
    hook = getattr(api, "save_snapshot", None) if api else None
    if hook is None:
        raise MarmotError("--save-snapshot: snapshots are not available in this build")
    info = await hook(runtime.js, runtime.cluster, runtime.node, str(runtime.config.db_path), force=True,
                      show_progress=None)
    log.info("snapshot saved: %s", getattr(info, "name", info))
