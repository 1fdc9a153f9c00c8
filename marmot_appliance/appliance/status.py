"""`status`: every node's processes and health, as text or JSON.

A node is healthy when its runtime process is running, its GET /health answers 200 and (for
embedded NATS) its nats-server process is running. Everything shown about replication (NATS
connectivity, lag per stream, last publish/apply, dead letters, last snapshot) comes from the
node's own /health, so `status` reports what the node itself knows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from marmot_appliance.appliance import health
from marmot_appliance.appliance.resources import NATS_KIND, NODE_KIND, resource_name
from marmot_appliance.appliance.state import ProcessRecord, RecordedState, StateDir
from marmot_appliance.appliance.supervisor import is_running
from marmot_appliance.nats_client import default_state_dir
from marmot_appliance.spec.model import Cluster


@dataclass
class ProcessStatus:
    resource: str
    pid: int | None
    running: bool

    def to_dict(self) -> dict:
        return {"resource": self.resource, "pid": self.pid, "running": self.running}


@dataclass
class NodeStatus:
    name: str
    runtime: ProcessStatus
    nats_server: ProcessStatus | None  # None: NATS is not embedded
    health: health.NodeHealth
    problems: list[str] = field(default_factory=list)
    # Tables or views that differ from the spec's schema or from the other nodes (not a
    # problem: a rolling change passes through it; docs/schema.md "Drift").
    schema_drift: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "node": self.name,
            "healthy": self.healthy,
            "problems": list(self.problems),
            "runtime": self.runtime.to_dict(),
            "nats_server": self.nats_server.to_dict() if self.nats_server else None,
            "schema_drift": list(self.schema_drift),
            "health_http_status": self.health.http_status,
            "health": self.health.body,
        }


def _process_status(resource: str, record: ProcessRecord | None) -> ProcessStatus:
    if record is None:
        return ProcessStatus(resource, None, False)
    running = is_running(record)
    return ProcessStatus(resource, record.pid if running else None, running)


def collect_status(cluster: Cluster) -> list[NodeStatus]:
    state = StateDir(default_state_dir(cluster).resolve())
    recorded = state.load(cluster.name) if state.exists() else RecordedState(cluster=cluster.name)
    statuses = []
    for node in sorted(cluster.nodes, key=lambda n: n.id):
        runtime_name = resource_name(NODE_KIND, node.name)
        runtime = _process_status(runtime_name, recorded.processes.get(runtime_name))
        nats = None
        if cluster.nats.embedded:
            nats_name = resource_name(NATS_KIND, node.name)
            nats = _process_status(nats_name, recorded.processes.get(nats_name))
        node_health = health.fetch_node_health(cluster, node)
        problems = []
        if not runtime.running:
            problems.append("node runtime not running")
        if nats is not None and not nats.running:
            problems.append("nats-server not running")
        if not node_health.healthy:
            problems.append(node_health.describe())
        statuses.append(NodeStatus(node.name, runtime, nats, node_health, problems))
    _add_schema_drift(cluster, statuses)
    return statuses


def _add_schema_drift(cluster: Cluster, statuses: list[NodeStatus]) -> None:
    from marmot_appliance.schema.drift import declared_fingerprints, schema_drift

    reported = {status.name: (status.health.body or {}).get("schema") or None for status in statuses}
    for node, lines in schema_drift(reported, declared_fingerprints(cluster.schema)).items():
        next(status for status in statuses if status.name == node).schema_drift = lines


def _ago(timestamp: object) -> str:
    if not isinstance(timestamp, (int, float)):
        return "never"
    seconds = max(0.0, time.time() - float(timestamp))
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _waiting_rows_lines(body: dict) -> list[str]:
    """Rows held for clock skew (the node cannot converge with that origin yet) and parked rows."""
    lines = []
    skew = body.get("clock_skew") or {}
    for origin, held in sorted((skew.get("held") or {}).items()):
        lines.append(
            f"    clock skew: node {origin} is {held.get('ahead_s')}s ahead of this node's clock "
            f"(max {skew.get('max_clock_skew_s')}s): {held.get('rows')} row(s) held"
        )
    for origin, refused in sorted((skew.get("dead_lettered") or {}).items()):
        lines.append(f"    clock skew: {refused.get('rows')} row(s) from node {origin} dead-lettered "
                     f"(up to {refused.get('max_ahead_s')}s ahead)")
    if body.get("parked_rows"):
        lines.append(f"    parked rows: {body['parked_rows']} (waiting for a table or column)")
    return lines


def _restore_lines(body: dict) -> list[str]:
    """Snapshot restores inside the running node (docs/snapshots.md, "A restore inside a running node")."""
    restore = body.get("restore")
    if not isinstance(restore, dict):
        return []
    lines = []
    if restore.get("state") not in (None, "idle"):
        lines.append(f"    snapshot restore {restore['state']}: {restore.get('reason') or '-'}")
    if restore.get("restores") or restore.get("adoptions"):
        lines.append(f"    snapshot restores while running: {restore.get('restores') or 0}; "
                     f"replaced files adopted: {restore.get('adoptions') or 0}")
    if restore.get("last_error"):
        lines.append(f"    last snapshot restore failed: {restore['last_error']}")
    return lines


def _size(value: object) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"


def _bookkeeping_lines(body: dict) -> list[str]:
    """Size of the `_marmot_*` tables and tombstone collection (docs/capture.md, "Bookkeeping size")."""
    lines = []
    size = body.get("bookkeeping")
    if isinstance(size, dict) and size:
        lines.append(f"    bookkeeping: {size.get('rows', '-')} row(s), {_size(size.get('bytes'))}; "
                     f"tombstones kept: {size.get('tombstones', '-')}")
    collector = body.get("tombstones")
    if isinstance(collector, dict) and collector:
        line = (f"    tombstones collected: {collector.get('collected_total', 0)}; horizon: {collector.get('horizon', 0)}; "
                f"last round: {_ago(collector.get('last_round'))}")
        if collector.get("waiting_for"):
            line += f"; waiting for a horizon record of: {', '.join(map(str, collector['waiting_for']))}"
        if collector.get("stale_nodes"):
            line += f"; left out (down past the timeout): {', '.join(map(str, collector['stale_nodes']))}"
        lines.append(line)
        reseeded = collector.get("reseeded") or {}
        if isinstance(reseeded, dict) and reseeded:
            lines.append(f"    re-seeded {_ago(reseeded.get('at'))} from {reseeded.get('snapshot') or '-'}: "
                         f"{reseeded.get('rows_set_aside', 0)} local row(s) set aside as dead letters")
        if collector.get("error"):
            lines.append(f"    tombstone collection: {collector['error']}")
    if body.get("reseed_error"):
        lines.append(f"    {body['reseed_error']}")
    change_log = body.get("change_log")
    if isinstance(change_log, dict) and change_log.get("alarm"):
        lines.append(f"    change log not draining: {change_log['alarm']}")
    if body.get("dead_letters_dropped"):
        lines.append(f"    dead letters dropped past replication.max_dead_letters: {body['dead_letters_dropped']}")
    return lines


def render_status_text(cluster: Cluster, statuses: list[NodeStatus]) -> str:
    lines = [f"Cluster {cluster.name!r}:"]
    for status in statuses:
        body = status.health.body or {}
        # A node starting or restoring a snapshot is not healthy yet, but says what it is doing.
        state = status.health.state
        verdict = "healthy" if status.healthy else (state.upper() if state in ("starting", "restoring") else "UNHEALTHY")
        lines.append(f"  {status.name}: {verdict}")
        runtime = f"pid {status.runtime.pid}" if status.runtime.running else "not running"
        line = f"    runtime: {runtime}"
        if status.nats_server is not None:
            nats_pid = f"pid {status.nats_server.pid}" if status.nats_server.running else "not running"
            line += f"; nats-server: {nats_pid}"
        lines.append(line)
        if body:
            connected = (body.get("nats") or {}).get("connected")
            lag = body.get("lag") or {}
            lag_text = ", ".join(f"{stream}={behind}" for stream, behind in sorted(lag.items())) or "-"
            lines.append(f"    NATS connected: {'yes' if connected else 'no'}; lag: {lag_text}")
            lines.append(
                f"    last publish: {_ago(body.get('last_publish'))}; last apply: {_ago(body.get('last_apply'))}; "
                f"dead letters: {body.get('dead_letters', '-')}; last snapshot: {_ago(body.get('last_snapshot'))}"
            )
            lines.extend(_waiting_rows_lines(body))
            lines.extend(_restore_lines(body))
            lines.extend(_bookkeeping_lines(body))
            for table, found in sorted((body.get("diverged") or {}).items()):
                found = found if isinstance(found, dict) else {}
                keys = ", ".join(repr(k.get("key")) for k in found.get("sample") or [] if isinstance(k, dict))
                lines.append(
                    f"    diverged: table {table}: {found.get('keys')} key(s) differ between nodes "
                    f"(since {_ago(found.get('since'))}; e.g. {keys or '-'}); run `marmot-appliance repair`"
                )
            for stream, reset in sorted((body.get("stream_resets") or {}).items()):
                reset = reset if isinstance(reset, dict) else {}
                lines.append(
                    f"    stream reset: {stream} ({_ago(reset.get('at'))}): {reset.get('reason')}; "
                    f"replayed from 0, {reset.get('republished_rows', 0)} own row(s) re-published"
                )
            for stream, gap in sorted((body.get("gaps") or {}).items()):
                gap = gap if isinstance(gap, dict) else {}
                lines.append(
                    f"    gap: {stream} lost entries {gap.get('missing_from')}..{gap.get('missing_to')} before "
                    f"they were applied (since {_ago(gap.get('since'))}); not applying this stream: "
                    f"{gap.get('recovery') or 'waiting for a snapshot'}"
                )
        for drift in status.schema_drift:
            lines.append(f"    schema drift: {drift}")
        for problem in status.problems:
            lines.append(f"    problem: {problem}")
    healthy = sum(1 for s in statuses if s.healthy)
    lines.append(f"{healthy} of {len(statuses)} nodes healthy.")
    return "\n".join(lines)


def render_status_json(cluster: Cluster, statuses: list[NodeStatus]) -> str:
    return json.dumps(
        {
            "cluster": cluster.name,
            "healthy": all(s.healthy for s in statuses),
            "nodes": [s.to_dict() for s in statuses],
        },
        indent=2,
    )
