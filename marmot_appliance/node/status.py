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
    # has closed the gap: {"missing_from", "missing_to", "missing", "since"} (see consumer.py)
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

    @property
    def healthy(self) -> bool:
        # Not healthy until every part runs: a tool that starts writing as soon as /health says
        # ok would otherwise commit rows before the triggers exist (never published: existing
        # rows are the shared starting state, see docs/capture.md), and apply would call a node
        # healthy that is still deciding whether to restore a snapshot.
        return (
            self.nats_connected and self.database_ok and self.capture_installed and self.started
            and not self.failed_parts and not self.clock_skew.get("held") and not self.gaps and not self.apply_blocked
            and not self.diverged and not self.reseed_error and not self.change_log.get("alarm")
        )

    def as_health(self) -> dict:
        return {
            "status": "ok" if self.healthy else "unhealthy",
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
