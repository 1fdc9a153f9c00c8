"""When the change log is "not draining": publishing does not keep up with the writers, or has
stopped. The rows are never dropped (they are the only copy of those writes); the node says so
on /health (503), in `status` and as `marmot_change_log_alarm` (docs/capture.md, "Bounded
bookkeeping"; docs/monitoring.md has the runbook)."""

from __future__ import annotations

from marmot_appliance.spec.model import ReplicationSettings


def change_log_alarm(pending_rows: int, oldest_age_s: float, replication: ReplicationSettings) -> str | None:
    """The alarm's text, or None while the log drains within the configured bounds."""
    reasons = []
    if pending_rows > replication.change_log_alarm_rows:
        reasons.append(f"{pending_rows} captured rows pending (more than replication.change_log_alarm_rows="
                       f"{replication.change_log_alarm_rows})")
    if oldest_age_s > replication.change_log_alarm_age_s:
        reasons.append(f"the oldest pending row was written {oldest_age_s:.0f}s ago (more than "
                       f"replication.change_log_alarm_age_s={replication.change_log_alarm_age_s:g})")
    if not reasons:
        return None
    return "; ".join(reasons) + ": publishing is not keeping up (is NATS reachable? see docs/monitoring.md)"
