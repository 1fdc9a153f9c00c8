"""Is a process healthy? nats-servers via their monitor port, node runtimes via GET /health.

Every wait polls with an explicit deadline and fails fast when the process being waited for
has exited, with a message naming it and the tail of its log.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from marmot_appliance.appliance.errors import UnhealthyError
from marmot_appliance.appliance.progress import Progress
from marmot_appliance.appliance.state import ProcessRecord
from marmot_appliance.appliance.supervisor import is_running, log_tail
from marmot_appliance.natsd.from_spec import listen_host, monitor_probe_host
from marmot_appliance.natsd.process import jetstream_meta_leader
from marmot_appliance.spec.model import Cluster, Node

POLL_INTERVAL_S = 0.2
HTTP_TIMEOUT_S = 3.0


def http_host(listen_address: str) -> str:
    """Where to reach a server bound to `listen_address` from this machine."""
    if listen_address in ("0.0.0.0", ""):
        return "127.0.0.1"
    if listen_address == "::":
        return "::1"
    return listen_address


def _url(host: str, port: int, path: str) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}{path}"


@dataclass(frozen=True)
class NodeHealth:
    http_status: int | None  # None: nothing answered
    body: dict | None
    error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.http_status == 200

    def describe(self) -> str:
        if self.http_status is None:
            return f"/health unreachable ({self.error})"
        if self.body is None:
            return f"/health answered {self.http_status} without JSON"
        if self.body.get("reason"):
            # "starting" / "restoring" / "unhealthy" and why, in the node's own words.
            return f"/health answered {self.http_status}: {self.body.get('status')}: {self.body['reason']}"
        return f"/health answered {self.http_status}: {json.dumps(self.body, sort_keys=True)}"

    @property
    def state(self) -> str:
        """What the node says it is doing ("ok", "starting", "restoring", "unhealthy"), or
        "unreachable"."""
        if self.http_status is None:
            return "unreachable"
        status = (self.body or {}).get("status")
        return status if isinstance(status, str) and status else ("ok" if self.healthy else "unhealthy")


def node_health_url(cluster: Cluster, node: Node) -> str:
    return _url(http_host(cluster.observability.listen_address), node.ports.metrics, "/health")


def node_metrics_url(cluster: Cluster, node: Node) -> str:
    return _url(http_host(cluster.observability.listen_address), node.ports.metrics, "/metrics")


def fetch_node_health(cluster: Cluster, node: Node, timeout_s: float = HTTP_TIMEOUT_S) -> NodeHealth:
    url = node_health_url(cluster, node)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (local)
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:  # 503 carries the same JSON body
        status, raw = exc.code, exc.read()
    except (OSError, ValueError) as exc:
        return NodeHealth(None, None, str(getattr(exc, "reason", exc)))
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return NodeHealth(status, body if isinstance(body, dict) else None)


def nats_server_healthz(cluster: Cluster, node: Node, timeout_s: float = HTTP_TIMEOUT_S) -> bool:
    """The server's own /healthz: JetStream enabled and current with the meta group."""
    url = _url(monitor_probe_host(cluster, node), node.ports.monitor, "/healthz")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (local)
            return response.status == 200
    except (OSError, ValueError):
        return False


def client_port_open(node: Node, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((listen_host(node), node.ports.client), timeout=timeout_s):
            return True
    except OSError:
        return False


def _failure(resource: str, record: ProcessRecord | None, problem: str) -> UnhealthyError:
    lines = [f"{resource} {problem}"]
    if record is not None:
        state = f"running as pid {record.pid}" if is_running(record) else f"exited (was pid {record.pid})"
        lines[0] += f"; the process is {state}"
        tail = log_tail(record.log_path)
        lines.append(f"last lines of {record.log_path}:")
        lines.append(tail or "(log is empty)")
    return UnhealthyError("\n".join(lines))


def wait_for(
    resource: str,
    record: ProcessRecord | None,
    check: Callable[[], str | None],
    timeout_s: float,
    progress: Progress,
    what: str,
) -> None:
    """Poll `check` (None = done, else what is still missing) until done or the deadline.

    Fails at once when the recorded process exited: waiting longer cannot help.
    """
    deadline = time.monotonic() + timeout_s
    missing: str | None = "not checked yet"
    while True:
        if record is not None and not is_running(record):
            progress.clear()
            raise _failure(resource, record, f"stopped while waiting for {what}")
        missing = check()
        if missing is None:
            return
        if time.monotonic() >= deadline:
            progress.clear()
            raise _failure(resource, record, f"did not become healthy within {timeout_s:.0f}s: {missing}")
        progress.waiting(f"waiting for {resource}: {what}")
        time.sleep(POLL_INTERVAL_S)


def meta_leader_problem(cluster: Cluster) -> str | None:
    """None when every embedded server sees the same JetStream meta leader."""
    leaders = {
        node.name: jetstream_meta_leader(monitor_probe_host(cluster, node), node.ports.monitor) for node in cluster.nodes
    }
    without = sorted(name for name, leader in leaders.items() if leader is None)
    if without:
        return f"no JetStream meta leader seen by {', '.join(without)}"
    if len(set(leaders.values())) != 1:
        return f"servers disagree on the JetStream meta leader: {leaders}"
    return None


def nats_server_problem(cluster: Cluster, node: Node) -> str | None:
    if not client_port_open(node):
        return f"client port {listen_host(node)}:{node.ports.client} not accepting connections"
    problem = meta_leader_problem(cluster)
    if problem:
        return problem
    if not nats_server_healthz(cluster, node):
        return "/healthz not ok yet (JetStream catching up)"
    return None


def node_problem(cluster: Cluster, node: Node) -> str | None:
    health = fetch_node_health(cluster, node)
    return None if health.healthy else health.describe()
