"""Every metric family a node exports: name, kind, HELP text, label names, buckets.

One list, so /metrics, docs/replication.md ("Health and metrics"), the alert rules and the
Grafana dashboard (monitoring/) can be checked against it (tests/test_metrics.py,
tests/test_monitoring.py). Names are without the `marmot_` prefix; counters get `_total` on
/metrics. NODE_FAMILIES are listed from start-up (unlabelled ones at 0, except `unsampled` ones,
which have no sample until there is something to measure); VERIFY_FAMILIES only once the
continuous convergence check runs (`verify.interval_s`).
"""

from __future__ import annotations

from typing import NamedTuple


class Family(NamedTuple):
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only (+Inf is added)
    unsampled: bool = False  # gauges only: no sample until first set (an age of 0 would be a lie)


SCHEMA_FINGERPRINT_HELP = (
    "Each table's schema fingerprint as a number (the first 48 bits of the hex fingerprint on /health); "
    "nodes with equal values hold the same schema for the table"
)
GAPS_HELP = "Shard streams with entries gone before this node applied them (no snapshot closed it yet)"

# Buckets for the distributions operators ask for. Commit-to-visible spans a few milliseconds on
# a LAN (docs/performance.md: p50 about 5 ms at 1,000 rows/s) to minutes for a node catching up;
# an apply transaction a fraction of a millisecond (one small message) to seconds (64 messages
# or a 32 MiB run at once, a lock held by the application); a publish round's acks about a
# millisecond on loopback to the 10 s ack timeout (a lost stream leader).
COMMIT_TO_VISIBLE_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 60.0, 300.0)
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PUBLISH_ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

NODE_FAMILIES = (
    Family("rows_published", "counter", "Rows acknowledged by JetStream"),
    Family("batches_published", "counter", "Batches acknowledged by JetStream"),
    Family("bytes_uncompressed", "counter", "Payload bytes before compression"),
    Family("bytes_compressed", "counter", "Payload bytes sent (after compression)"),
    Family("rows_applied", "counter", "Rows applied from other nodes"),
    Family("batches_applied", "counter", "Batches applied"),
    Family("dead_letters", "counter", "Messages and rows set aside in the dead-letter table"),
    Family("dead_letter_bytes", "counter", "Payload bytes kept in the dead-letter table"),
    Family("dead_letters_truncated", "counter", "Dead letters whose payload was cut to the kept maximum"),
    Family("rows_oversized", "counter", "Rows too large to replicate, dead-lettered on their origin"),
    Family("runs_split", "counter", "Publisher runs applied before their end arrived"),
    Family("forged_messages", "counter", "Messages whose origin does not match their publisher's subject"),
    Family("pending_rows", "gauge", "Captured rows not yet acknowledged"),
    Family("gaps", "gauge", GAPS_HELP),
    Family("gaps_closed_by_republish", "counter", "Gaps closed by every node publishing its rows again"),
    Family("snapshot_restores", "counter", "Snapshots restored while the node was running"),
    Family("snapshot_restore_in_progress", "gauge", "1 while a snapshot restore is pending or running on this node"),
    Family("snapshot_age_seconds", "gauge", "Seconds since the newest snapshot this node knows of", unsampled=True),
    Family("tombstones_collected", "counter", "Tombstones removed below the horizon"),
    Family("tombstones", "gauge", "Tombstones kept in the versions tables"),
    Family("tombstone_horizon", "gauge", "Version at or below which this node collected its tombstones (0: never)"),
    Family("reseeds", "counter", "Re-seeds because this node came back past the tombstone horizon"),
    Family("bookkeeping_bytes", "gauge", "Bytes of every _marmot_* table and index (SQLite dbstat)"),
    Family("bookkeeping_rows", "gauge", "Rows of each _marmot_* table", ("table",)),
    Family("change_log_oldest_age_seconds", "gauge", "Age of the oldest captured row not yet acknowledged (0: drained)"),
    Family("change_log_alarm", "gauge", "1 while the change log is not draining (replication.change_log_alarm_*)"),
    Family("dead_letters_dropped", "counter", "Oldest dead letters deleted past replication.max_dead_letters"),
    Family("wal_frames_pending", "gauge",
           "WAL frames not yet copied into the database file at the runtime's last checkpoint (every second)"),
    Family("healthy", "gauge", "1 while /health answers 200 (status ok), 0 while it answers 503"),
    Family("errors", "counter", "Errors by kind", ("kind",)),
    Family("stream_lag", "gauge", "Stream entries not yet applied", ("stream",)),
    Family("stream_resets", "counter", "Shard streams found re-created (positions reset)", ("stream",)),
    Family("stream_gap_entries", "gauge", "Entries retention dropped before this node applied them (0: no gap)",
           ("stream",)),
    Family("apply_blocked", "gauge", "1 while a stream waits for the database to accept writes", ("stream",)),
    Family("schema_table_fingerprint", "gauge", SCHEMA_FINGERPRINT_HELP, ("table",)),
    # Rows that wait (node/waiting_rows.py).
    Family("parked_rows", "gauge", "Rows waiting for a table or column this node lacks"),
    Family("parked_overflow", "counter", "Rows dead-lettered because replication.max_parked_rows was reached"),
    Family("parked_retry_rows", "counter", "Parked rows looked at by retries after schema changes"),
    Family("clock_skew_held_rows", "gauge", "Rows held because their version is beyond max_clock_skew_s, by origin",
           ("origin",)),
    Family("clock_skew_seconds", "gauge",
           "How far ahead of this node's clock an origin's newest held or refused version is", ("origin",)),
    Family("clock_skew_dead_letters", "counter", "Rows dead-lettered for a version absurdly far ahead, by origin",
           ("origin",)),
    # Distributions (docs/replication.md, "Health and metrics").
    Family("commit_to_visible_seconds", "histogram",
           "Seconds from a row's commit on its origin (its version's clock) to the commit that made it visible "
           "here; one observation per applied message, for its newest row",
           buckets=COMMIT_TO_VISIBLE_BUCKETS),
    Family("apply_transaction_seconds", "histogram",
           "Seconds one apply transaction (one or several messages) took on the database thread",
           buckets=APPLY_BUCKETS),
    Family("publish_ack_seconds", "histogram",
           "Seconds from sending a publish round to JetStream's acknowledgement of all of it",
           buckets=PUBLISH_ACK_BUCKETS),
)

VERIFY_FAMILIES = (
    Family("diverged_keys", "gauge", "Keys found diverged by the continuous convergence check, per table", ("table",)),
    Family("verify_checks", "counter", "Continuous convergence checks by result", ("result",)),
)
