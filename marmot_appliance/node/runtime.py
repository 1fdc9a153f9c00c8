"""The node runtime: one asyncio process beside one SQLite file.

Start-up order (each step's failure is a clear message and exit 1, except NATS reachability,
which is retried while /health reports "unhealthy"):

1. the database must exist, be in WAL mode and belong to this node id, and no other process may
   work on it (a lock beside it, node/db_lock.py; `--cleanup` removes bookkeeping and exits);
2. /health and /metrics start listening (the appliance polls them while we connect);
3. install capture (triggers, log, clock; one transaction) — before anything waits on the
   network, so writes made while NATS is slow to answer are captured and published later;
4. connect to NATS (unlimited reconnects), create or check the shard streams, re-check the
   schema (tables created meanwhile), publish what is pending (a never-replicated database
   about to be replaced by a snapshot publishes its unknown rows first: it joins, nothing is
   silently replaced);
5. restore a snapshot if a stream's log was truncated below our position (a gap no snapshot
   closes does not stop the start: the stream is held and reported, docs/replication.md "Gaps");
6. one consumer per shard stream from the stored position, the publisher, the maintenance loop.

A snapshot restore while running (a consumer found a gap) stops the publisher and every consumer
first, and restarts them from the restored positions (node/restore_coordinator.py).

SIGTERM / SIGINT: stop capture-driven publishing after flushing what is in flight, let each
consumer finish the batch it is applying (positions are committed with every batch), write the
seq-map copy, `nc.drain()`, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors

from marmot_appliance.errors import DatabaseStateError, MarmotError
from marmot_appliance.nats_client import failure_reason, shown_servers
from marmot_appliance.node import snapshot_bridge, waiting_rows
from marmot_appliance.node.backlog_alarm import change_log_alarm
from marmot_appliance.node.config import NodeConfig
from marmot_appliance.node.db_lock import DatabaseLock
from marmot_appliance.node.gap_closer import GapCloser
from marmot_appliance.node.restore_coordinator import RestoreCoordinator
from marmot_appliance.node.seq_map import write_seq_map
from marmot_appliance.node.status import RuntimeStatus
from marmot_appliance.node.tombstone_collector import TombstoneCollector
from marmot_appliance.observability.http import ObservabilityServer
from marmot_appliance.observability.metrics import Metrics
from marmot_appliance.replication.backlog import change_log_backlog, trim_dead_letters
from marmot_appliance.replication.consumer import ResumeAfter, ShardConsumer
from marmot_appliance.replication.db_thread import DbThread
from marmot_appliance.replication.own_publishes import OwnPublishes
from marmot_appliance.replication.publisher import Publisher
from marmot_appliance.replication.sharding import shard_numbers
from marmot_appliance.replication.streams import StreamSetupError, ensure_streams, retry_while_settling
from marmot_appliance.replication.wakeup import CommitWakeup
from marmot_appliance.replication.wal_checkpoint import CHECKPOINT_INTERVAL_S, WalCheckpointer
from marmot_appliance.retry import backoff_delay, sleep_or_stop
from marmot_appliance.snapshots.errors import SnapshotError

log = logging.getLogger(__name__)

STREAM_SETUP_TIMEOUT_S = 60.0
SCHEMA_CHECK_S = 0.5
PARKED_RETRY_S = 2.0  # how often parked rows are looked at (work only after a schema change) and held rows
STATUS_REFRESH_S = 1.0
FLOW_PAUSE_TIMEOUT_S = 30.0  # consumers and the publisher finish their batch within this, or are cancelled
PUBLISH_ASYNC_WINDOW = 1024
# A stream error with these words is a configuration problem, not a transient one.
FATAL_STREAM_ERRORS = ("insufficient resources", "replicas", "subjects overlap", "exists with subjects")


class NodeRuntime:
    """Runs one node until `stop` is set. Use `await NodeRuntime(config).run(stop)`."""

    def __init__(self, config: NodeConfig, metrics: Metrics | None = None):
        self.config = config
        self.cluster = config.cluster
        self.node = config.node
        self.replication = config.cluster.replication
        self.metrics = metrics or Metrics()  # every family a node exports (observability/families.py)
        self.status = RuntimeStatus(node=self.node.name, db_path=str(config.db_path))
        self.waiting = waiting_rows.WaitingRowsReporter(self.status, self.metrics, self.replication.max_clock_skew_s)
        self.http: ObservabilityServer | None = None
        self.nc: Any = None
        self.js: Any = None
        self.capture: Any = None
        self.applier: Any = None
        self.capture_db = DbThread(f"capture-{self.node.name}")
        self.apply_db = DbThread(f"apply-{self.node.name}")
        # The publisher retires acknowledged rows here, on a connection of its own, so a retire
        # waiting for the write lock never delays reading (and sending) the next commits.
        self.retire_db = DbThread(f"retire-{self.node.name}")
        # The only connection of the runtime that checkpoints the WAL (replication/wal_checkpoint.py).
        self.checkpoint_db = DbThread(f"checkpoint-{self.node.name}")
        self.wal = WalCheckpointer(config.db_path)
        self.wakeup: CommitWakeup | None = None
        self.publisher: Publisher | None = None
        self.consumers: list[ShardConsumer] = []
        self.own_publishes = OwnPublishes()
        self.snapshot_scheduler: Any = None
        self.verify_service: Any = None  # answers `verify` over NATS (verify/service.py)
        self.continuous_verify: Any = None  # verify.interval_s: compares with the others on a schedule
        self._verify_task: asyncio.Task | None = None
        self.restores = RestoreCoordinator(self)
        self.tombstones = TombstoneCollector(self)
        self.gap_closer = GapCloser(self)
        self._db_lock = DatabaseLock(config.db_path, f"node {self.node.name}")
        # The consumers and the publisher run on _flow_stop, which a restore sets to pause them.
        self._flow_stop = asyncio.Event()
        self._flow_tasks: list[asyncio.Task] = []
        self._last_seq_map: dict[str, int] | None = None
        self._closing = False
        self._snapshot_requested = False  # this node asked the cluster for a snapshot (a gap)
        self._republished_at: float | None = None  # time.monotonic() of the last re-publish (stream reset)
        self._node_id_changes = False  # the database was another node id's (--allow-node-id-change)
        self._part_failed = asyncio.Event()  # a runtime part (consumer, publisher, ...) died

    # -- health ----------------------------------------------------------------------------

    def health(self) -> dict:
        self._refresh_gauges()
        health = self.status.as_health()
        health["restore"] = self.restores.state.as_health()
        return health

    def _refresh_gauges(self) -> None:
        self.metrics.set("gaps", len(self.status.gaps))
        # What /health answers at this moment (its "status" is RuntimeStatus.healthy; the alert
        # MarmotNodeUnhealthy reads this).
        self.status.nats_connected = bool(self.nc is not None and self.nc.is_connected)
        self.status.unsubscribed = [consumer.stream for consumer in self.consumers if not consumer.subscribed]
        self.metrics.set("healthy", 1 if self.status.healthy else 0)
        if self.snapshot_scheduler is not None:
            self.status.last_snapshot = getattr(self.snapshot_scheduler, "last_snapshot", None)
        if self.status.last_snapshot:
            self.metrics.set("snapshot_age_seconds", time.time() - self.status.last_snapshot)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        db_path = self.config.db_path
        if not self.config.save_snapshot and db_path.exists():
            # One process works on a database at a time: a second node, or `snapshot restore`
            # replacing the file under this node, is refused (node/db_lock.py).
            try:
                self._db_lock.acquire()
            except MarmotError:
                self._shutdown_threads()
                raise
        if self.config.cleanup:
            from marmot_appliance.replication.capture import remove_bookkeeping

            try:
                await self.capture_db.run(_check_database, db_path)
                await self.capture_db.run(remove_bookkeeping, str(db_path))
            finally:
                self._db_lock.release()
                self._shutdown_threads()
            log.info("removed triggers, change log and bookkeeping from %s; user data untouched", db_path)
            return 0
        try:
            self._node_id_changes = await self.capture_db.run(
                _check_database, db_path, self.node.id, self.config.allow_node_id_change
            )
            await self._start_http()
            if not self.config.save_snapshot:
                # Capture first, before anything waits on the network: every write from now on
                # is in the log and goes out once NATS answers, however long that takes.
                await self._open_database()
            if not await self._connect(stop):
                return 0
            await self._ensure_streams(stop)
            if self.config.save_snapshot:
                return await self._save_snapshot_and_exit()
            await self._check_schema()  # tables created while we waited are captured (and backfilled)
            tasks = await self._start_parts(stop)
            await self._wait_for_stop_or_failure(stop)
            await self._stop_parts(tasks)
            if self.status.failed_parts:
                # A part died from a bug: exit non-zero so systemd (Restart=on-failure) or the
                # next `apply` restarts the node, instead of running on half-dead forever.
                log.error("stopping: runtime part(s) failed: %s", ", ".join(self.status.failed_parts))
                return 1
            return 0
        finally:
            await self._close()

    async def _start_http(self) -> None:
        if self.config.http_host is None:
            return
        self.http = ObservabilityServer(
            self.config.http_host, self.config.http_port, self.health, self.metrics, self._refresh_gauges
        )
        try:
            await self.http.start()
        except OSError as exc:
            self.http = None
            raise MarmotError(
                f"cannot serve /health and /metrics on {self.config.http_host}:{self.config.http_port}: {exc.strerror}"
            ) from exc
        log.info("serving /health and /metrics on http://%s:%d", self.config.http_host, self.http.port)

    async def _connect(self, stop: asyncio.Event) -> bool:
        """Connect, retrying until it works or `stop` is set (False then)."""
        kwargs = dict(self.config.nats_connect)
        kwargs.setdefault("connect_timeout", self.cluster.nats.connect_timeout_s)

        async def disconnected():
            self.status.nats_connected = False
            if not self._closing:
                log.warning("disconnected from NATS; reconnecting")

        async def reconnected():
            self.status.nats_connected = True
            log.info("reconnected to NATS at %s", self.nc.connected_url.netloc if self.nc.connected_url else "?")

        async def error(exc):
            log.debug("NATS client error: %s", exc)

        kwargs.update(
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            pending_size=64 * 1024 * 1024,
        )
        attempt = 0
        while not stop.is_set():
            try:
                self.nc = await nats.connect(**kwargs)
                break
            except (nats.errors.Error, OSError, asyncio.TimeoutError) as exc:
                attempt += 1
                delay = backoff_delay(attempt, 0.2, 5.0, max_exponent=5)
                servers = shown_servers(kwargs.get("servers"))  # never a password from a URL in the log
                level = logging.WARNING if attempt <= 3 or attempt % 20 == 0 else logging.DEBUG
                log.log(level, "cannot reach NATS at %s: %s; retrying in %.1fs", servers,
                        failure_reason(exc, kwargs.get("connect_timeout")), delay)
                await sleep_or_stop(stop, delay)
        if self.nc is None:
            return False
        self.status.nats_connected = True
        self.js = self.nc.jetstream(timeout=10.0, publish_async_max_pending=PUBLISH_ASYNC_WINDOW)
        log.info("connected to NATS (max payload %d bytes)", self.nc.max_payload)
        return True

    async def _ensure_streams(self, stop: asyncio.Event) -> None:
        replicas = self.cluster.effective_log_replicas

        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, StreamSetupError):
                return not any(word in str(exc).lower() for word in FATAL_STREAM_ERRORS)
            return isinstance(exc, (nats.errors.Error, asyncio.TimeoutError))

        try:
            await retry_while_settling(
                "creating the shard streams", lambda: ensure_streams(self.js, self.replication, replicas),
                STREAM_SETUP_TIMEOUT_S, retryable, stop,
            )
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            raise MarmotError(f"JetStream did not answer while creating the shard streams: {exc}") from exc

    async def _open_database(self) -> None:
        from marmot_appliance.replication.applier import BatchApplier, reset_own_origin_horizon
        from marmot_appliance.replication.capture import ChangeCapture

        db = str(self.config.db_path)
        selection = self.node.tables
        node_id = self.node.id
        self.capture = await self.capture_db.run(
            ChangeCapture, db, node_id, selection, allow_node_id_change=self.config.allow_node_id_change
        )
        report = await self.capture_db.run(self.capture.install)
        if self._node_id_changes:
            # This node's own earlier writes may be missing from a file that was another node's:
            # own-origin rows on the streams are applied (version-checked), not skipped.
            await self.capture_db.run(reset_own_origin_horizon, db)
        for warning in getattr(report, "warnings", ()):
            log.warning("%s", warning)
        log.info("capturing %d table(s): %s", len(report.tables), ", ".join(report.tables) or "(none yet)")
        await self._refresh_schema_fingerprints()
        await self.capture_db.run(self.capture.use_retire_connection)
        self.status.capture_installed = True
        self.applier = await self.apply_db.run(
            BatchApplier, db, node_id, selection, max_clock_skew_s=self.replication.max_clock_skew_s,
            max_parked_rows=self.replication.max_parked_rows,
        )

    # -- parts -----------------------------------------------------------------------------

    async def _start_parts(self, stop: asyncio.Event) -> list[asyncio.Task]:
        self.wakeup = CommitWakeup(
            self.config.db_path, self.replication.poll_interval_ms / 1000.0, use_inotify=self.config.use_inotify
        )
        self.wakeup.start()
        self.status.capture_mode = self.wakeup.mode
        self.publisher = Publisher(
            self.js, self.capture, self.capture_db, self.node.id, self.replication, self.nc.max_payload,
            self.wakeup, self.metrics, self.status, retire_db=self.retire_db,
            # Only a consuming node takes its acknowledged sequences back out of this set.
            own_publishes=self.own_publishes if self.node.replicate else None,
        )
        # Changes committed while we were down go out first; then a lagging node may restore.
        if self.node.publish:
            await self._join_before_boot_restore()
            # Back after the cluster collected tombstones past our unpublished writes: they are
            # set aside (never published) and the node is re-seeded from a snapshot below.
            reseed = await self.tombstones.guard_before_publish()
            await self.publisher.flush()
            if reseed and self.node.replicate:
                await self._reseed(stop)
        else:
            await self.capture_db.run(self.capture.discard_unpublished)
        if self.cluster.snapshots.enabled and self.node.replicate:
            await self._restore_at_start(stop)
        self.parts_stop = asyncio.Event()  # consumers, publisher, scheduler stop on this, after `stop`
        self._start_snapshot_scheduler()
        tasks: list[asyncio.Task] = []
        if self.node.replicate:
            positions = await self.apply_db.run(self.applier.positions)
            for shard in shard_numbers(self.replication.shards):
                stream = self.replication.stream_name(shard)
                consumer = ShardConsumer(
                    self.js, self.applier, self.apply_db, stream, self.replication.subject(shard), self.node.id,
                    self.metrics, self.status, positions.get(stream, 0), own_publishes=self.own_publishes,
                    on_truncated=self._on_truncated, on_replaced=self.restores.request_adopt,
                    on_reset=self._on_stream_reset,
                )
                self.consumers.append(consumer)
        self._start_flow()
        await self._start_verify_service()
        tasks.append(asyncio.create_task(self._maintenance(self.parts_stop), name="maintenance"))
        tasks.append(asyncio.create_task(self._checkpoint_wal(self.parts_stop), name="wal-checkpoint"))
        tasks.append(asyncio.create_task(self.restores.run(self.parts_stop), name="restore-coordinator"))
        for task in tasks:
            task.add_done_callback(self._part_finished)
        self.status.started = True
        log.info(
            "node %s (id %d) running: %d shard(s), replicas %d, wake-up by %s",
            self.node.name, self.node.id, self.replication.shards, self.cluster.effective_log_replicas,
            self.wakeup.mode,
        )
        return tasks

    async def _reseed(self, stop: asyncio.Event) -> None:
        """Replace the database by the newest snapshot (the rows written below the horizon were
        set aside): the node takes the cluster's state instead of resurrecting deleted rows."""
        from marmot_appliance.snapshots.restore import restore_snapshot

        try:
            info = await retry_while_settling(
                "the re-seed restore",
                lambda: restore_snapshot(self.js, self.cluster, self.node, str(self.config.db_path)),
                STREAM_SETUP_TIMEOUT_S, lambda exc: isinstance(exc, (nats.errors.Error, asyncio.TimeoutError)), stop,
            )
        except (MarmotError, nats.errors.Error, asyncio.TimeoutError) as exc:
            # Fail closed: the node runs on, reported, until an operator re-seeds it.
            self.status.reseed_error = f"re-seed failed: {exc}; restore a snapshot (docs/capture.md)"
            log.error("cannot re-seed from a snapshot: %s", exc)
            return
        self.tombstones.state.reseeded["snapshot"] = getattr(info, "name", None)
        log.warning("re-seeded from snapshot %s", getattr(info, "name", "?"))
        await self.adopt_database()

    async def _join_before_boot_restore(self) -> None:
        """A database that was never replicated but holds rows nobody published, about to be
        replaced by the start-up restore: publish those rows first (they join the cluster, last
        writer wins), so the restore removes nothing the cluster does not have. The replay after
        the restore brings them back (own rows older than the restore are applied)."""
        if not (self.cluster.snapshots.enabled and self.node.replicate):
            return
        if await self.apply_db.run(self.applier.positions):
            return  # replicated before: its rows are known (published or applied)
        try:
            replacing = await snapshot_bridge.restore_would_replace_new_database(self)
        except (MarmotError, nats.errors.Error, asyncio.TimeoutError) as exc:
            log.debug("start-up snapshot check deferred: %s", exc)  # the restore check retries it
            replacing = False
        if not replacing:
            return
        joined = await self.capture_db.run(self.capture.log_unknown_rows)
        if joined:
            log.warning(
                "this database was never replicated but holds %d row(s) the cluster does not know; "
                "publishing them before the start-up snapshot restore (they join the cluster, last writer wins)",
                joined,
            )

    async def _start_verify_service(self) -> None:
        from marmot_appliance.verify.service import VerifyService

        self.verify_service = VerifyService(
            self.nc, self.node, self.replication, str(self.config.db_path), applied=lambda: dict(self.status.applied),
            js=self.js, relog=lambda: self.relog_own_rows("asked by a node closing a gap (node/gap_closer.py)"),
        )
        await self.verify_service.start()
        if self.cluster.verify.interval_s:
            from marmot_appliance.verify.continuous import ContinuousVerify

            self.continuous_verify = ContinuousVerify(self.nc, self.cluster, self.node, self.status, self.metrics)
            self._verify_task = asyncio.create_task(self.continuous_verify.run(self.parts_stop), name="verify")

    async def _wait_for_stop_or_failure(self, stop: asyncio.Event) -> None:
        stop_waiter = asyncio.ensure_future(stop.wait())
        failure_waiter = asyncio.ensure_future(self._part_failed.wait())
        try:
            await asyncio.wait({stop_waiter, failure_waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_waiter.cancel()
            failure_waiter.cancel()

    def _part_finished(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A part died from a bug: say so loudly, show it on /health (unhealthy) and stop
            # the runtime with a failure exit (see run()).
            log.error("runtime part %s failed: %s", task.get_name(), exc, exc_info=exc)
            self.status.failed_parts[task.get_name()] = f"{type(exc).__name__}: {exc}"
            self._part_failed.set()

    # -- the flow: consumers and publisher, paused around a restore ---------------------------

    def _start_flow(self) -> None:
        self._flow_stop = asyncio.Event()
        tasks = [
            asyncio.create_task(consumer.run(self._flow_stop), name=f"consume-{consumer.stream}")
            for consumer in self.consumers
        ]
        if self.node.publish:
            # _start_parts makes the publisher before the flow first starts; a resume follows a pause.
            assert self.publisher is not None
            tasks.append(asyncio.create_task(self.publisher.run(self._flow_stop), name="publish"))
        for task in tasks:
            task.add_done_callback(self._part_finished)
        self._flow_tasks = tasks

    async def pause_flow(self) -> None:
        """Stop the publisher and every consumer; return once none of them can write any more."""
        self._flow_stop.set()
        if self.wakeup is not None:
            self.wakeup.notify()
        tasks, self._flow_tasks = self._flow_tasks, []
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=FLOW_PAUSE_TIMEOUT_S)
        for task in pending:
            log.warning("%s did not stop within %.0fs for a restore; cancelling it", task.get_name(),
                        FLOW_PAUSE_TIMEOUT_S)
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        # A cancelled apply may still run on the apply thread; this call queues behind it, so
        # once it returns nothing from before the pause can still commit.
        await self.apply_db.run(lambda: None)

    async def resume_flow(self) -> None:
        """Start the consumers (from the positions the file holds now) and the publisher again."""
        if self.parts_stop.is_set():
            return
        if self.consumers:
            positions = await self.apply_db.run(self.applier.positions)
            for consumer in self.consumers:
                consumer.restart_from(positions.get(consumer.stream, 0))
        self._start_flow()

    async def _stop_parts(self, tasks: list[asyncio.Task]) -> None:
        log.info("shutting down: flushing publishes, finishing applies")
        self.parts_stop.set()
        self._flow_stop.set()
        if self.wakeup is not None:
            self.wakeup.notify()
        # A restore running now finishes (or fails) first: it resumes nothing once parts_stop is set.
        done, pending = await asyncio.wait([*tasks, *self._flow_tasks], timeout=30.0)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        scheduler_task = getattr(self.snapshot_scheduler, "task", None)
        if scheduler_task is not None:
            try:
                await asyncio.wait_for(scheduler_task, 30.0)
            except Exception as exc:  # noqa: BLE001 - a failed or slow save must not block shutdown
                log.warning("snapshot scheduler did not stop cleanly: %s", exc)
        await self._write_seq_map()
        await self.gap_closer.stop()
        if self._verify_task is not None:
            self._verify_task.cancel()
            await asyncio.gather(self._verify_task, return_exceptions=True)
        if self.verify_service is not None:
            await self.verify_service.stop()

    async def _close(self) -> None:
        self._closing = True
        if self.wakeup is not None:
            await self.wakeup.close()
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), 10.0)
            except Exception as exc:  # noqa: BLE001 - closing anyway
                log.debug("drain incomplete: %s", exc)
                try:
                    await self.nc.close()
                except Exception:  # noqa: BLE001
                    pass
        if self.http is not None:
            await self.http.close()
        for thread, part in ((self.capture_db, self.capture), (self.apply_db, self.applier),
                             (self.checkpoint_db, self.wal)):
            if part is not None:
                try:
                    await thread.run(part.close)
                except Exception as exc:  # noqa: BLE001
                    log.debug("close: %s", exc)
        self._shutdown_threads()
        self._db_lock.release()

    def _shutdown_threads(self) -> None:
        self.capture_db.shutdown()
        self.apply_db.shutdown()
        self.retire_db.shutdown()
        self.checkpoint_db.shutdown()

    # -- periodic work -----------------------------------------------------------------------

    async def _checkpoint_wal(self, stop: asyncio.Event) -> None:
        """A PASSIVE checkpoint every CHECKPOINT_INTERVAL_S, on a connection and thread of its own."""
        while not stop.is_set():
            if await sleep_or_stop(stop, CHECKPOINT_INTERVAL_S):
                return
            if self.restores.busy:
                continue  # the restore writes the file through the backup API; checkpoint after it
            try:
                state = await self.checkpoint_db.run(self.wal.checkpoint)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried next tick; the WAL only grows meanwhile
                self.metrics.inc("errors", kind="checkpoint")
                log.warning("WAL checkpoint failed: %s", exc)
                continue
            self.metrics.set("wal_frames_pending", state.frames - state.checkpointed)

    async def _maintenance(self, stop: asyncio.Event) -> None:
        """Schema drift, parked rows, log purge, status, seq-map copy. One slow loop."""
        last_purge = last_parked = last_status = time.monotonic()
        last_tombstones = 0.0  # a first round soon after start: the record tells the others we are back
        while not stop.is_set():
            if await sleep_or_stop(stop, SCHEMA_CHECK_S):
                return
            if self.restores.busy:
                continue  # the file is being replaced; the capture is re-installed after it
            now = time.monotonic()
            if self._snapshot_requested and not self.status.gaps:
                await self._withdraw_snapshot_request()
            if not self.status.gaps:
                self.gap_closer.forget()
            try:
                await self._check_schema()
                if now - last_parked >= PARKED_RETRY_S:
                    last_parked = now
                    # Parked rows: work only when the schema changed since the last look (also
                    # the first look after start, and after a restore); held rows once due.
                    await waiting_rows.retry_parked(self.apply_db, self.applier)
                    await waiting_rows.retry_held(self.apply_db, self.applier)
                if now - last_purge >= self.replication.cleanup_interval_s:
                    last_purge = now
                    purged = await self.capture_db.run(self.capture.purge_published)
                    if purged:
                        log.debug("purged %d published log row(s)", purged)
                    if not self.node.publish:
                        # Nobody publishes this log: keep it from growing forever.
                        discarded = await self.capture_db.run(self.capture.discard_unpublished)
                        if discarded:
                            log.debug("publish: false: dropped %d captured row(s) from the log", discarded)
                if now - last_tombstones >= self.replication.tombstone_interval_s:
                    last_tombstones = now
                    await self._tombstone_round()
                if now - last_status >= STATUS_REFRESH_S:
                    last_status = now
                    await self._refresh_status()
                self.status.database_ok = True
                self.status.database_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported on /health, retried next tick
                self.status.database_ok = False
                self.status.database_error = f"{type(exc).__name__}: {exc}"
                self.metrics.inc("errors", kind="database")
                log.warning("database maintenance failed: %s", exc)

    async def _tombstone_round(self) -> None:
        try:
            await self.tombstones.run_round()
            self.tombstones.state.error = None
            await self._refresh_bookkeeping()
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            self.tombstones.state.error = f"horizon bucket unreachable: {exc}"
            log.debug("tombstone round skipped: %s", exc)

    async def _check_schema(self) -> None:
        changed = await self.capture_db.run(self.capture.schema_changed)
        if not changed:
            return
        report = await self.capture_db.run(self.capture.install)
        for warning in getattr(report, "warnings", ()):
            log.warning("%s", warning)
        log.info("schema changed: capture re-installed on %d table(s)", len(report.tables))
        await self._refresh_schema_fingerprints()
        if self.publisher is not None:
            self.publisher.schema_changed()
        await waiting_rows.retry_parked(self.apply_db, self.applier)
        if self.wakeup is not None:
            self.wakeup.notify()

    async def _refresh_schema_fingerprints(self) -> None:
        """Per-table schema fingerprints on /health and /metrics (docs/schema.md, "Drift")."""
        from marmot_appliance.schema.migrate import database_shape

        try:
            shape = await self.capture_db.run(database_shape, self.config.db_path)
        except MarmotError as exc:
            log.warning("cannot read the schema for its fingerprints: %s", exc)
            return
        tables = shape.table_fingerprints()
        for table in (self.status.schema.get("tables") or {}):
            if table not in tables:
                self.metrics.remove("schema_table_fingerprint", table=table)
        for table, fingerprint in tables.items():
            self.metrics.set("schema_table_fingerprint", int(fingerprint[:12], 16), table=table)
        self.status.schema = {"tables": tables, "views": shape.view_fingerprints()}

    async def _refresh_status(self) -> None:
        await self._refresh_change_log()
        await self._trim_dead_letters()
        self.status.dead_letters = await self.apply_db.run(self.applier.dead_letter_count)
        self.waiting.publish(await self.apply_db.run(self.applier.waiting_report))
        self.metrics.set("pending_rows", self.status.pending_rows)
        self.status.tombstones = self.tombstones.state.as_status()
        await self._write_seq_map()

    async def _refresh_change_log(self) -> None:
        """Pending rows, the oldest one's age, and the alarm when publishing does not keep up
        (docs/capture.md, "Bounded bookkeeping")."""
        backlog = await self.capture_db.run(change_log_backlog, str(self.config.db_path))
        age = backlog.oldest_age_s(time.time())
        alarm = change_log_alarm(backlog.rows, age, self.replication)
        if alarm and not self.status.change_log.get("alarm"):
            log.warning("change log not draining: %s", alarm)
        self.status.pending_rows = backlog.rows
        self.status.change_log = {"pending_rows": backlog.rows, "oldest_age_s": round(age, 3), "alarm": alarm}
        self.metrics.set("pending_rows", backlog.rows)
        self.metrics.set("change_log_oldest_age_seconds", age)
        self.metrics.set("change_log_alarm", 1 if alarm else 0)

    async def _trim_dead_letters(self) -> None:
        """Keep at most replication.max_dead_letters; the oldest go, counted and logged."""
        dropped = await self.apply_db.run(trim_dead_letters, str(self.config.db_path), self.replication.max_dead_letters)
        if dropped:
            self.status.dead_letters_dropped += dropped
            self.metrics.inc("dead_letters_dropped", dropped)
            log.warning(
                "dropped the %d oldest dead letter(s) past replication.max_dead_letters=%d (%d dropped since start)",
                dropped, self.replication.max_dead_letters, self.status.dead_letters_dropped,
            )

    async def _refresh_bookkeeping(self) -> None:
        from marmot_appliance.replication.horizon import bookkeeping_size

        size = await self.apply_db.run(bookkeeping_size, str(self.config.db_path))
        for table, rows in size.rows.items():
            self.metrics.set("bookkeeping_rows", rows, table=table)
        if size.bytes is not None:
            self.metrics.set("bookkeeping_bytes", size.bytes)
        self.metrics.set("tombstones", size.tombstones)
        self.metrics.set("tombstone_horizon", size.horizon)
        self.status.bookkeeping = {"rows": sum(size.rows.values()), "bytes": size.bytes, "tombstones": size.tombstones}

    async def _write_seq_map(self) -> None:
        path = self.node.seq_map_path
        if not path or self.applier is None:
            return
        try:
            positions = await self.apply_db.run(self.applier.positions)
            if positions != self._last_seq_map:
                await asyncio.to_thread(write_seq_map, path, positions)
                self._last_seq_map = positions
        except Exception as exc:  # noqa: BLE001 - the copy is advisory; the database is the truth
            log.warning("cannot write seq map %s: %s", path, exc)

    # -- snapshots ---------------------------------------------------------------------------

    async def restore_database(self) -> bool:
        """Restore a snapshot if this node needs one; nothing may be applying or publishing.

        At start-up before the parts run; while running only through the RestoreCoordinator,
        which pauses the flow first."""
        restored = await snapshot_bridge.restore_if_needed(self)
        if restored:
            log.info("restored a snapshot; re-installing capture, consumers resume from its positions")
            await self.adopt_database()
        return bool(restored)

    async def adopt_database(self) -> dict[str, int]:
        """Take the file as it is now (restored or replaced): capture, positions, the fence."""
        # [snapshots] The restored file lacks what this process published just before (the
        # pre-restore flush): those messages must be applied on replay, not skipped as ours.
        for shard in shard_numbers(self.replication.shards):
            self.own_publishes.forget_below(self.replication.stream_name(shard), 2**63)
        await self.capture_db.run(self.capture.install)
        if self.publisher is not None:
            self.publisher.schema_changed()
        positions = await self.apply_db.run(self.applier.adopt_database)
        for consumer in self.consumers:
            consumer.restart_from(positions.get(consumer.stream, 0))
        return positions

    async def _restore_at_start(self, stop: asyncio.Event) -> None:
        """The start-up restore decision, retried while JetStream is still settling.

        Right after the servers start, reading the snapshot manifest can time out or find no
        responders; that must not kill the node (it did, and the cluster lost a replica)."""
        try:
            await retry_while_settling(
                "the start-up snapshot check", self.restore_database, STREAM_SETUP_TIMEOUT_S,
                lambda exc: isinstance(exc, (nats.errors.Error, asyncio.TimeoutError)), stop,
            )
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            raise MarmotError(f"JetStream did not answer while checking for a snapshot to restore: {exc}") from exc
        except SnapshotError as exc:
            # A gap no snapshot closes (or a restore refused) is not a reason to exit: a systemd
            # restart loop helps nobody. The node starts; the consumer of each gapped stream
            # holds before the gap, /health says so, and a snapshot is asked for (docs/replication.md).
            log.error("cannot restore a snapshot at start: %s", exc)
            self.metrics.inc("errors", kind="restore")

    async def _on_truncated(self, stream: str, expected: int, available: int) -> bool | ResumeAfter:
        """A consumer found entries expected..available-1 gone. True: a restore was requested and
        the consumer holds until it is restarted; False: no snapshot closes the gap yet (the
        consumer holds with an open gap and asks again in a few seconds).

        A restore is requested only when a kept snapshot covers the gap (pausing every consumer
        for a restore bound to fail would stall the healthy shards too); otherwise the cluster
        is asked to save one (snapshots/requests.py)."""
        log.warning("stream %s: next entry %d is gone (stream now starts at %d)", stream, expected, available)
        if not self.cluster.snapshots.enabled:
            closing = self.gap_closer.decide(stream, available)
            if isinstance(closing, ResumeAfter):
                return closing
            self.status.gap_recovery[stream] = f"snapshots are disabled on this node; {closing}"
            return False
        try:
            needed = await snapshot_bridge.snapshot_needed(self, {stream: available - 1})
            covering = await snapshot_bridge.snapshot_covering(self, needed)
            if covering is None:
                await snapshot_bridge.request_snapshot(self, needed)
                self._snapshot_requested = True
                closing = self.gap_closer.decide(stream, available)
                if isinstance(closing, ResumeAfter):
                    return closing
                self.status.gap_recovery[stream] = (
                    f"no kept snapshot reflects {stream} up to {available - 1}; asked the cluster for one; {closing}"
                )
                return False
        except (MarmotError, nats.errors.Error, asyncio.TimeoutError) as exc:
            self.status.gap_recovery[stream] = f"cannot reach the snapshot store ({exc}); retrying"
            log.warning("stream %s: cannot look for or ask for a snapshot: %s", stream, exc)
            return False
        self.status.gap_recovery[stream] = f"restoring snapshot {covering}"
        return self.restores.request_restore(
            stream, f"stream {stream}: entries {expected}..{available - 1} are gone before this node applied them"
        )

    async def _on_stream_reset(self, stream: str, reason: str, previous: int) -> None:
        """A consumer found its stream re-created and replays it from 0. Entries of the old
        instance that some node never applied are gone with it, so every node re-publishes the
        newest version of each row it originated (last writer wins makes the copies harmless)."""
        self.metrics.inc("stream_resets", stream=stream)
        republished = 0
        if self.node.publish and (self._republished_at is None or time.monotonic() - self._republished_at > 60):
            self._republished_at = time.monotonic()  # once for all shards reset together
            republished = await self.relog_own_rows(f"after {reason}")
        self.status.stream_resets[stream] = {
            "at": time.time(), "reason": reason, "previous_position": previous, "republished_rows": republished,
        }

    async def relog_own_rows(self, why: str) -> int:
        """Log again (committed when this returns) the newest version of every row this node
        originated, to be published once more; returns the rows logged."""
        logged = await self.capture_db.run(self.capture.relog_own_rows)
        log.warning("re-publishing %d row(s) this node wrote, %s", logged, why)
        if self.publisher is not None:
            self.publisher.reread_log()
        if self.wakeup is not None:
            self.wakeup.notify()
        return logged

    async def _withdraw_snapshot_request(self) -> None:
        """Every gap is closed: take this node's snapshot request back (best effort; a request
        a newer snapshot covers is ignored by the savers anyway)."""
        try:
            await asyncio.wait_for(snapshot_bridge.withdraw_request(self), 10.0)
            self._snapshot_requested = False
        except (MarmotError, nats.errors.Error, asyncio.TimeoutError) as exc:
            log.debug("snapshot request not withdrawn yet: %s", exc)

    def saving_blocked(self) -> str | None:
        """Why this node must not save a snapshot now (a restore, or a gap: its positions on that
        stream stay behind what the log still has, so its snapshot would not serve anyone)."""
        blocked = self.restores.saving_blocked()
        if blocked is None and self.status.gaps:
            blocked = f"this node has a gap on {', '.join(sorted(self.status.gaps))}"
        return blocked

    def _start_snapshot_scheduler(self) -> None:
        if not self.cluster.snapshots.enabled:
            return
        self.snapshot_scheduler = snapshot_bridge.start_scheduler(self)

    async def _save_snapshot_and_exit(self) -> int:
        await snapshot_bridge.save_snapshot_now(self)
        return 0


def _check_database(path: Path, node_id: int | None = None, allow_node_id_change: bool = False) -> bool:
    """The database must exist, be in WAL mode and belong to this node id (checked without
    changing anything). True when it belongs to another id and the operator allowed the change."""
    from marmot_appliance.replication.capture import (
        NodeIdChangeError,
        database_owner,
        node_id_change_message,
        require_wal,
    )

    if not path.exists():
        raise DatabaseStateError(f"database {path} does not exist (create it, in WAL mode, first)")
    require_wal(str(path))
    if node_id is None:
        return False
    owner, pending = database_owner(path)
    if owner is None or owner == node_id:
        return False
    if not allow_node_id_change:
        raise NodeIdChangeError(node_id_change_message(path, owner, node_id, pending))
    return True


async def run_until_signal(config: NodeConfig) -> int:
    """The CLI entry: run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await NodeRuntime(config).run(stop)
