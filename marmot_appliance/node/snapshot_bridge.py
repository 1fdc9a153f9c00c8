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
    """Restore the newest snapshot when a stream was truncated below this node's position."""
    api = _snapshots_api()
    hook = getattr(api, "restore_if_needed", None) if api else None
    if hook is None:
        log.warning("snapshot restore is not available in this build; a truncated log cannot be recovered")
        return False
    return bool(
        await hook(
            runtime.js, runtime.cluster, runtime.node, str(runtime.config.db_path),
        )
    )


def start_scheduler(runtime: Any) -> Any | None:
    api = _snapshots_api()
    scheduler_class = getattr(api, "SnapshotScheduler", None) if api else None
    if scheduler_class is None:
        return None
    scheduler = scheduler_class(runtime.js, runtime.cluster, runtime.node, str(runtime.config.db_path))
    start = getattr(scheduler, "start", None)
    if start is not None:
        start()
    return scheduler


async def save_snapshot_now(runtime: Any) -> None:
    api = _snapshots_api()
    hook = getattr(api, "save_snapshot", None) if api else None
    if hook is None:
        raise MarmotError("--save-snapshot: snapshots are not available in this build")
    await hook(runtime.js, runtime.cluster, runtime.node, str(runtime.config.db_path))
