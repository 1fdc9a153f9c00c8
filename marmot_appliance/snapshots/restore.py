"""Restore: decide whether this node needs a snapshot, then bring the newest valid one in.

When (checked at start, before consuming):
  * gap: a shard stream's first sequence is beyond this node's applied position + 1 while the
    stream holds messages past that position (retention removed entries we never applied);
  * never replicated: the database has no applied positions at all, and a snapshot exists
    (a new node; faster than replaying the whole retained log, and the only way when the log
    no longer starts at 1).
A gap that no kept snapshot closes fails closed with a message saying what to do: silently
continuing would leave this node without rows the cluster has (Marmot v1's fail-open).

How: local changes not yet published are published first (`flush_pending`), or the restore is
refused; the newest snapshot is downloaded to a scratch file beside the database and verified
(a checksum mismatch falls back to the previous snapshot); the copy is made this node's (see
dbrestore.py) and written into the live database with SQLite's backup API. The consumers then
replay every stream from the restored positions.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nats.js.errors
from nats.js import JetStreamContext

from marmot_appliance.snapshots.dbrestore import backup_into_live, prepare_copy_for_node, refresh_own_clock
from marmot_appliance.snapshots.errors import (
    ChecksumMismatchError,
    NoSnapshotError,
    RestoreRefusedError,
    SnapshotError,
)
from marmot_appliance.snapshots.local_state import has_user_rows, open_readonly, pending_count, read_positions
from marmot_appliance.snapshots.manifest import Manifest, SnapshotInfo
from marmot_appliance.snapshots.progress import finish_progress, progress_for
from marmot_appliance.snapshots.save import open_store, scratch_dir, stream_names
from marmot_appliance.snapshots.store import SnapshotStore
from marmot_appliance.spec.model import Cluster, Node

log = logging.getLogger(__name__)

FlushPending = Callable[[], Any]  # sync or async; publishes every captured local change
PENDING_RETRIES = 3


@dataclass(frozen=True)
class RestoreDecision:
    needed: bool
    reason: str
    local_positions: dict[str, int] = field(default_factory=dict)
    # stream -> (first_seq, last_seq) as JetStream reports them; (0, 0) for a missing stream
    streams: dict[str, tuple[int, int]] = field(default_factory=dict)
    # stream -> the lowest snapshot position that closes this node's gap on it
    required: dict[str, int] = field(default_factory=dict)
    never_replicated: bool = False


async def stream_bounds(js: JetStreamContext, cluster: Cluster) -> dict[str, tuple[int, int]]:
    bounds = {}
    for stream in stream_names(cluster):
        try:
            info = await js.stream_info(stream)
            bounds[stream] = (int(info.state.first_seq or 0), int(info.state.last_seq or 0))
        except nats.js.errors.NotFoundError:
            bounds[stream] = (0, 0)
    return bounds


def _read_local(db_path: Path) -> tuple[dict[str, int], int, bool]:
    """(positions, pending local changes, has user rows); an absent or empty file has none."""
    if not db_path.exists() or db_path.stat().st_size == 0:
        return {}, 0, False
    conn = open_readonly(db_path)
    try:
        return read_positions(conn), pending_count(conn), has_user_rows(conn)
    finally:
        conn.close()


async def _newest_snapshot(js: JetStreamContext, cluster: Cluster) -> SnapshotInfo | None:
    try:
        store = await open_store(js, cluster, create=False)
    except SnapshotError:
        return None
    manifest, _revision = await store.read_manifest()
    return manifest.newest


async def decide_restore(js: JetStreamContext, cluster: Cluster, node: Node, db_path: str | Path) -> RestoreDecision:
    """Whether `node` must restore a snapshot before consuming, and why."""
    if not node.replicate:
        return RestoreDecision(False, "this node does not apply other nodes' changes (replicate: false)")
    positions, _pending, _rows = await asyncio.to_thread(_read_local, Path(db_path))
    bounds = await stream_bounds(js, cluster)
    required: dict[str, int] = {}
    reasons = []
    for stream, (first, last) in bounds.items():
        applied = positions.get(stream, 0)
        if last > applied and first > applied + 1:
            required[stream] = first - 1
            reasons.append(f"stream {stream} now starts at {first} but this node applied only up to {applied}")
    if required:
        return RestoreDecision(True, "; ".join(reasons), positions, bounds, required, not positions)
    if not positions:
        newest = await _newest_snapshot(js, cluster)
        if newest is not None:
            return RestoreDecision(
                True, f"this database was never replicated and snapshot {newest.name} exists", positions, bounds,
                never_replicated=True,
            )
        return RestoreDecision(False, "never replicated, no snapshot: replaying the streams from the start",
                               positions, bounds, never_replicated=True)
    return RestoreDecision(False, "every stream continues from this node's positions", positions, bounds)


async def restore_if_needed(
    js: JetStreamContext,
    cluster: Cluster,
    node: Node,
    db_path: str | Path,
    flush_pending: FlushPending | None = None,
    *,
    show_progress: bool | None = False,
    work_dir: Path | None = None,
) -> bool:
    """Restore the newest valid snapshot when this node cannot continue from the log alone.

    Call at start, before consuming. Returns True when a snapshot was restored (the consumers
    then start from the restored positions). Raises NoSnapshotError when the node has a gap no
    snapshot closes, RestoreRefusedError when local changes cannot be published first.
    """
    decision = await decide_restore(js, cluster, node, db_path)
    if not decision.needed:
        log.debug("no snapshot restore needed: %s", decision.reason)
        return False
    log.warning("restoring a snapshot: %s", decision.reason)
    await restore_snapshot(
        js, cluster, node, db_path, flush_pending=flush_pending, required=decision.required,
        show_progress=show_progress, work_dir=work_dir,
    )
    return True


async def _flush(flush_pending: FlushPending | None, db_path: Path) -> int:
    """Publish local changes via the runtime's callback; returns how many are still pending."""
    _positions, pending, _rows = await asyncio.to_thread(_read_local, db_path)
    if pending and flush_pending is not None:
        log.info("publishing %d local change(s) before restoring", pending)
        result = flush_pending()
        if inspect.isawaitable(result):
            await result
        _positions, pending, _rows = await asyncio.to_thread(_read_local, db_path)
    return pending


def _usable(
    candidates: list[SnapshotInfo], needed: dict[str, int], node: Node, *, named: bool
) -> list[SnapshotInfo]:
    """The candidates that close every gap and speak for every table this node replicates."""
    problems: list[str] = []
    usable = []
    for candidate in candidates:
        problem = candidate.selection_problem(node.tables.selects)
        if problem is not None:
            problems.append(problem)
        elif not candidate.covers(needed):
            short = {s: seq for s, seq in needed.items() if candidate.positions.get(s, 0) < seq}
            problems.append(f"snapshot {candidate.name} reflects only "
                            + ", ".join(f"{s}={candidate.positions.get(s, 0)}" for s in sorted(short)))
        else:
            usable.append(candidate)
    if usable:
        return usable
    if named:
        raise NoSnapshotError(f"snapshot {candidates[0].name} cannot be restored into node {node.name}: "
                              + "; ".join(problems)
                              + "".join(f"; stream {s} no longer holds entries up to {seq}"
                                        for s, seq in sorted(needed.items())))
    raise NoSnapshotError(
        "this node cannot catch up: "
        + (", ".join(f"stream {s} no longer holds entries up to {seq}" for s, seq in sorted(needed.items()))
           or "no kept snapshot fits it")
        + ("; " + "; ".join(problems) if problems else "")
        + ". Save a snapshot on an up-to-date node that replicates every table this one does "
        "(`marmot-appliance snapshot save`), then restart this one."
    )


def _pending_now(db_path: Path) -> int:
    return _read_local(db_path)[1]


def _keep_pre_restore_copy(db_path: Path) -> Path:
    """A database that was never replicated but has rows: keep them beside it before replacing."""
    target = db_path.with_name(f"{db_path.name}.before-restore-{time.strftime('%Y%m%dT%H%M%S')}")
    conn = open_readonly(db_path)
    try:
        conn.execute("VACUUM main INTO ?", (str(target),))
    finally:
        conn.close()
    return target


async def restore_snapshot(
    js: JetStreamContext,
    cluster: Cluster,
    node: Node,
    db_path: str | Path,
    *,
    name: str | None = None,
    flush_pending: FlushPending | None = None,
    required: dict[str, int] | None = None,
    show_progress: bool | None = False,
    work_dir: Path | None = None,
    store: SnapshotStore | None = None,
) -> SnapshotInfo:
    """Restore snapshot `name` (default: the newest that verifies) into the live database."""
    db_path = Path(db_path)
    if store is None:
        try:
            store = await open_store(js, cluster, create=False)
        except NoSnapshotError:
            store = None
    manifest, _revision = await store.read_manifest() if store else (Manifest(), 0)
    candidates = list(manifest.snapshots)
    if name is not None:
        candidates = [s for s in candidates if s.name == name]
        if not candidates:
            known = ", ".join(s.name for s in manifest.snapshots) or "none"
            raise NoSnapshotError(f"no snapshot named {name!r} (kept snapshots: {known})")
    # Replay after the restore starts at the snapshot's position + 1 on *every* stream, so the
    # snapshot must reach each stream's first retained entry - 1, not only the gapped one's:
    # otherwise the restore itself opens a gap on another stream (issue 10, case 13).
    needed = dict(required or {})
    for stream, (first, _last) in (await stream_bounds(js, cluster)).items():
        if first > 1:
            needed[stream] = max(needed.get(stream, 0), first - 1)
    if not candidates or store is None:
        if required:
            raise NoSnapshotError(
                "this node cannot catch up: "
                + ", ".join(f"stream {s} no longer holds entries after {seq}" for s, seq in sorted(required.items()))
                + ", and no snapshot was ever saved. Save a snapshot on an up-to-date node "
                "(`marmot-appliance snapshot save`), then restart this one."
            )
        raise NoSnapshotError(f"no snapshot was ever saved in bucket {cluster.snapshot_bucket}")
    candidates = _usable(candidates, needed, node, named=name is not None)

    pending = await _flush(flush_pending, db_path)
    if pending:
        raise RestoreRefusedError(
            f"{pending} local change(s) in {db_path} are not published yet and restoring would drop them; "
            "start the node with NATS reachable so they are published first, then restore"
        )
    scratch = scratch_dir(db_path, work_dir)
    try:
        copy_path = scratch / "restore.db"
        failures = []
        chosen = None
        for candidate in candidates:
            progress = progress_for(f"downloading {candidate.name}", candidate.size, show_progress)
            try:
                await store.download(candidate, copy_path, progress)
            except (ChecksumMismatchError, SnapshotError) as exc:
                finish_progress(progress)
                failures.append(str(exc))
                log.error("%s; trying the previous snapshot", exc)
                copy_path.unlink(missing_ok=True)
                continue
            finish_progress(progress)
            chosen = candidate
            break
        if chosen is None:
            raise NoSnapshotError("no kept snapshot could be used:\n  " + "\n  ".join(failures))

        await asyncio.to_thread(
            prepare_copy_for_node, copy_path, db_path, node.id, stream_names(cluster), node.tables, node.publish
        )
        _positions, _pending, rows = await asyncio.to_thread(_read_local, db_path)
        if rows and not _positions:
            kept = await asyncio.to_thread(_keep_pre_restore_copy, db_path)
            log.warning("this database was never replicated but has rows; a copy was kept at %s", kept)
        for attempt in range(1, PENDING_RETRIES + 1):
            progress = progress_for(f"restoring into {db_path.name}", copy_path.stat().st_size, show_progress)
            try:
                await asyncio.to_thread(backup_into_live, copy_path, db_path, lambda: _pending_now(db_path), progress)
                finish_progress(progress)
                break
            except RestoreRefusedError:
                finish_progress(progress)
                if attempt == PENDING_RETRIES or flush_pending is None:
                    raise
                if await _flush(flush_pending, db_path):
                    raise
                # What was just published is newer than the copy's clock and horizon.
                await asyncio.to_thread(refresh_own_clock, copy_path, db_path)
        log.info("restored snapshot %s (positions %s)", chosen.name, chosen.positions or "{}")
        return chosen
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
