"""Snapshots tied to log positions: save, list and restore through the JetStream object store.

The node runtime calls:
  * `await restore_if_needed(js, cluster, node, db_path, flush_pending=callback)` at start,
    before consuming (True when a snapshot was restored);
  * `SnapshotScheduler(js, cluster, node, db_path, metrics).run(stop_event)` as a task;
  * `await save_snapshot(js, cluster, node, db_path)` for `--save-snapshot`.
Operators use `marmot-appliance snapshot save|list|restore` (cli/snapshot_commands.py).
"""

from marmot_appliance.snapshots.errors import (
    ChecksumMismatchError,
    LeaseLostError,
    NoSnapshotError,
    RestoreRefusedError,
    SnapshotBehind,
    SnapshotBusyError,
    SnapshotError,
    SnapshotSkipped,
    SnapshotUpToDate,
)
from marmot_appliance.snapshots.manifest import Manifest, SnapshotInfo
from marmot_appliance.snapshots.restore import decide_restore, restore_if_needed, restore_snapshot
from marmot_appliance.snapshots.save import open_store, save_snapshot
from marmot_appliance.snapshots.scheduler import SnapshotScheduler

__all__ = [
    "ChecksumMismatchError",
    "LeaseLostError",
    "Manifest",
    "NoSnapshotError",
    "RestoreRefusedError",
    "SnapshotBehind",
    "SnapshotBusyError",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotScheduler",
    "SnapshotSkipped",
    "SnapshotUpToDate",
    "decide_restore",
    "open_store",
    "restore_if_needed",
    "restore_snapshot",
    "save_snapshot",
]
