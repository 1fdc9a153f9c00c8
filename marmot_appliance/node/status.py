"""What the node knows about itself, read by /health and /metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RuntimeStatus:
    node: str
    db_path: str
    database_ok: bool = True
    database_error: str | None = None
    nats_connected: bool = False
    capture_installed: bool = False
    started: bool = False  # every part running (after the start-up flush and snapshot check)
    capture_mode: str | None = None  # "inotify" | "data_version"
    lag: dict[str, int] = field(default_factory=dict)  # stream -> entries behind
    applied: dict[str, int] = field(default_factory=dict)  # stream -> applied position
    last_publish: float | None = None  # unix time of the last positive ack
    last_apply: float | None = None  # unix time of the last applied batch
    dead_letters: int = 0
    last_snapshot: float | None = None
    pending_rows: int = 0  # captured rows not yet acknowledged by JetStream
    failed_parts: dict[str, str] = field(default_factory=dict)  # part name -> the error that ended it
    parked_rows: int = 0  # rows waiting for a table or column this node lacks
    # Rows from beyond replication.max_clock_skew_s: {"max_clock_skew_s": s, "held": {origin:
    # {"rows", "ahead_s"}}, "dead_lettered": {origin: {"rows", "max_ahead_s"}}}. Held rows make
    # the node unhealthy: it cannot converge with that origin until time catches up.
    clock_skew: dict = field(default_factory=dict)
    # stream -> the entries retention dropped before this node applied them, while no snapshot
    # has closed the gap: {"missing_from", "missing_to", "missing", "since"} (see replication/consumer_messages.py)
    gaps: dict[str, dict] = field(default_factory=dict)
    gap_recovery: dict[str, str] = field(default_factory=dict)  # stream -> what is being done about it
    # stream -> why applying it is paused: the database cannot be written (disk full, I/O error,
    # read-only file, lock held past busy_timeout). Retried until it passes; never dead-lettered.
    apply_blocked: dict[str, str] = field(default_factory=dict)
    # table -> what the continuous convergence check found: {"keys", "sample", "since",
    # "checked_at"} (verify/continuous.py). A diverged table makes the node unhealthy: the
    # copies differ in a way lag does not explain, and only `repair` settles it.
    diverged: dict[str, dict] = field(default_factory=dict)
    verify: dict = field(default_factory=dict)  # the last check: {"checked_at", "result", "unreachable"}
    # stream -> the last reset of its position (a re-created stream): {"at", "reason",
    # "previous_position", "republished_rows"}. Reported, not unhealthy: the node handled it.
    stream_resets: dict[str, dict] = field(default_factory=dict)
    # The database's schema as this node sees it: {"tables": {table: fingerprint}, "views":
    # {view: fingerprint}} (schema/shape.py). `status` and `plan` compare it across nodes and
    # with the spec's declared schema; a difference is reported, not unhealthy (docs/schema.md).
    schema: dict = field(default_factory=dict)
    # _marmot_* size: {"rows", "bytes", "tombstones"}; tombstone collection (node/tombstone_collector.py)
    bookkeeping: dict = field(default_factory=dict)
    tombstones: dict = field(default_factory=dict)
    # The node came back past the tombstone horizon and could not be re-seeded: it must not be
    # trusted to converge until an operator restores a snapshot.
    reseed_error: str | None = None
    # The change log: {"pending_rows", "oldest_age_s", "alarm"}. An alarm (publishing does not
    # keep up, replication.change_log_alarm_*) makes the node unhealthy: its writes are not
    # reaching the others (node/backlog_alarm.py).
    change_log: dict = field(default_factory=dict)
    dead_letters_dropped: int = 0  # oldest dead letters deleted past replication.max_dead_letters
    # What a snapshot restore inside the running node is doing, or None: every consumer and
    # the publisher are paused meanwhile (node/restore_coordinator.py).
    restoring: str | None = None
    # Shard streams whose consumer has not subscribed since start (or since the last restore).
    unsubscribed: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """What is wrong (the node cannot converge or replicate until it is fixed); [] if nothing."""
        problems = []
        if not self.nats_connected:
            problems.append("NATS not connected")
        if not self.database_ok:
            problems.append(f"database unusable: {self.database_error}")
        if self.failed_parts:
            problems.append("runtime part(s) failed: " + ", ".join(sorted(self.failed_parts)))
        if self.clock_skew.get("held"):
            problems.append("rows held for clock skew from node(s) " + ", ".join(map(str, sorted(self.clock_skew["held"]))))
        if self.gaps:
            problems.append("gap on " + ", ".join(sorted(self.gaps)))
        if self.apply_blocked:
            problems.append("waiting for the database to accept writes: " + ", ".join(sorted(self.apply_blocked)))
        if self.diverged:
            problems.append("diverged table(s): " + ", ".join(sorted(self.diverged)))
        if self.reseed_error:
            problems.append(self.reseed_error)
        if self.change_log.get("alarm"):
            problems.append(f"change log not draining: {self.change_log['alarm']}")
        return problems

    def state(self) -> tuple[str, str | None]:
        """("ok", None), or ("unhealthy" | "restoring" | "starting", why): /health's status and reason.

        Not ok until every stream is consumed: a tool that starts writing as soon as /health
        says ok would otherwise commit rows before the triggers exist (never published:
        existing rows are the shared starting state, see docs/capture.md), apply would call a
        node healthy that is still deciding whether to restore a snapshot, and a load balancer
        would send reads to a node whose consumers are paused for a restore."""
        problems = self.problems()
        if problems:
            return "unhealthy", "; ".join(problems)
        if self.restoring:
            return "restoring", self.restoring
        if not self.capture_installed:
            return "starting", "installing capture"
        if not self.started:
            return "starting", "publishing what was committed while the node was down, checking for a snapshot"
        if self.unsubscribed:
            return "starting", "shard consumer(s) not subscribed yet: " + ", ".join(sorted(self.unsubscribed))
        return "ok", None

    @property
    def healthy(self) -> bool:
        return self.state()[0] == "ok"

    def as_health(self) -> dict:
        status, reason = self.state()
        return {
            "status": status,
            "reason": reason,
            "started": self.started,
            "node": self.node,
            "database": {"ok": self.database_ok, "path": self.db_path, "error": self.database_error},
            "nats": {"connected": self.nats_connected},
            "capture": {"installed": self.capture_installed, "wakeup": self.capture_mode},
            "lag": dict(self.lag),
            "applied": dict(self.applied),
            "pending_rows": self.pending_rows,
            "failed_parts": dict(self.failed_parts),
            "stream_resets": {stream: dict(reset) for stream, reset in self.stream_resets.items()},
            "gaps": {
                stream: {**gap, "recovery": self.gap_recovery.get(stream)} for stream, gap in self.gaps.items()
            },
            "last_publish": self.last_publish,
            "last_apply": self.last_apply,
            "dead_letters": self.dead_letters,
            "last_snapshot": self.last_snapshot,
            "parked_rows": self.parked_rows,
            "clock_skew": dict(self.clock_skew),
            "apply_blocked": dict(self.apply_blocked),
            "diverged": dict(self.diverged),
            "verify": dict(self.verify),
            "schema": dict(self.schema),
            "bookkeeping": dict(self.bookkeeping),
            "tombstones": dict(self.tombstones),
            "reseed_error": self.reseed_error,
            "change_log": dict(self.change_log),
            "dead_letters_dropped": self.dead_letters_dropped,
        }
