"""plan / apply / status / destroy for specs whose nodes live on other hosts (Ansible).

plan     runs site.yml in check mode with --diff; the marmot_plan callback records every task
         that would change, and this module prints them per host, Terraform style.
apply    shows that plan, then runs site.yml for real; with nothing to change it says
         "No changes." and touches nothing.
status   runs status.yml: every node's /health read on its host, shown per node.
destroy  runs destroy.yml: services stopped and disabled; --purge also removes the node state
         and the JetStream store. Databases are never touched.

Hosts of a running lab are reached from its controller namespace (deploy.lab_launch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from marmot_appliance.deploy.errors import DeployError
from marmot_appliance.deploy.lab_launch import Launch, launch_for, unreachable_hint
from marmot_appliance.spec.model import Cluster

PLAYBOOK_TIMEOUT_S = 3600.0
EXIT_CHANGES_PENDING = 2  # plan --detailed-exitcode, as for local specs


def ansible_dir() -> Path:
    """ansible/ of the checkout, or the copy shipped inside the wheel."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here.parent / "ansible", here / "ansible"):
        if (candidate / "site.yml").is_file():
            return candidate
    raise DeployError("ansible/site.yml not found next to the marmot_appliance package")


def _ansible_playbook() -> str:
    candidate = Path(sys.executable).parent / "ansible-playbook"
    if candidate.is_file():
        return str(candidate)
    raise DeployError("ansible-playbook not found beside this Python; install ansible-core into this environment")


@dataclass
class RemotePlan:
    changes: dict[str, list[dict]] = field(default_factory=dict)  # host -> changed tasks
    failures: list[dict] = field(default_factory=list)

    @property
    def has_changes(self) -> bool:
        return any(self.changes.values())


def run_playbook(spec_path: Path, check: bool, extra_args: list[str] | None = None,
                 live_output: bool = False, playbook: str = "site.yml",
                 launch: Launch | None = None) -> tuple[int, dict, str]:
    """Run a playbook of ansible/ against the spec; (exit code, recorded plan JSON, output)."""
    directory = ansible_dir()
    launch = launch or Launch()
    with tempfile.TemporaryDirectory(prefix="marmot-plan-") as scratch:
        plan_file = Path(scratch) / "plan.json"
        env = dict(os.environ)
        enabled = [c for c in env.get("ANSIBLE_CALLBACKS_ENABLED", "").split(",") if c]
        env.update(
            {
                "ANSIBLE_CONFIG": str(directory / "ansible.cfg"),
                "ANSIBLE_CALLBACKS_ENABLED": ",".join([*enabled, "marmot_plan"]),
                "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1",
                "MARMOT_PLAN_FILE": str(plan_file),
                **launch.env,
            }
        )
        command = [*launch.prefix, _ansible_playbook(), "-i", str(spec_path.resolve()), str(directory / playbook),
                   *launch.extra_args, *(extra_args or [])]
        if check:
            command += ["--check", "--diff"]
        try:
            result = subprocess.run(
                command, env=env, text=True, timeout=PLAYBOOK_TIMEOUT_S, check=False,
                stdout=None if live_output else subprocess.PIPE,
                stderr=None if live_output else subprocess.STDOUT,
            )
        except subprocess.TimeoutExpired as exc:
            raise DeployError(f"ansible-playbook did not finish within {PLAYBOOK_TIMEOUT_S:.0f}s") from exc
        recorded = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
        return result.returncode, recorded, result.stdout or ""


def _failure_detail(cluster: Cluster | None, spec_path: Path, recorded: dict, output: str) -> str:
    failures = recorded.get("failures", [])
    detail = "\n".join(f"  {f['host']}: {f['task']}: {f['msg']}" for f in failures) or output[-3000:]
    unreachable = sorted({f["host"] for f in failures if f.get("unreachable")})
    if cluster is not None:
        detail += unreachable_hint(cluster, spec_path, unreachable)
    return detail


def compute_plan(spec_path: Path, extra_args: list[str] | None = None, launch: Launch | None = None,
                 cluster: Cluster | None = None) -> RemotePlan:
    code, recorded, output = run_playbook(spec_path, check=True, extra_args=extra_args, launch=launch)
    plan = RemotePlan(
        changes={host: [t for t in tasks if t["status"] == "changed"] for host, tasks in recorded.get("hosts", {}).items()},
        failures=recorded.get("failures", []),
    )
    if code != 0 or plan.failures:
        detail = _failure_detail(cluster, spec_path, recorded, output)
        raise DeployError(f"the check-mode run failed (ansible-playbook exit {code}):\n{detail}")
    return plan


def render_plan(plan: RemotePlan) -> str:
    if not plan.has_changes:
        return "No changes. The hosts match the spec."
    lines = []
    for host in sorted(plan.changes):
        tasks = plan.changes[host]
        if not tasks:
            continue
        lines.append(f"~ host {host}")
        for task in tasks:
            role = f"{task['role']}: " if task.get("role") else ""
            lines.append(f"    ~ {role}{task['task']}")
            for diff in task.get("diff", []):
                if diff.get("path"):
                    lines.append(f"        {diff['path']}")
    count = sum(len(t) for t in plan.changes.values())
    hosts = sum(1 for t in plan.changes.values() if t)
    lines.append(f"\nPlan: {count} change(s) on {hosts} host(s).")
    return "\n".join(lines)


def render_plan_json(plan: RemotePlan) -> str:
    return json.dumps({"changes": plan.changes, "has_changes": plan.has_changes}, indent=2, sort_keys=True)


def require_deployable(cluster: Cluster) -> None:
    """Refuse, before any host is touched, what the offline install cannot deliver."""
    if cluster.nats.auth.mode == "nkey":
        raise DeployError(
            "nats.auth.mode 'nkey' cannot be deployed to hosts yet: nodes need the nkeys package, "
            "which ships only as a source package, and the offline wheelhouse carries binary "
            "wheels only; use auth 'generated' or 'user' (docs/deploy.md, Secrets)"
        )


def plan_remote(cluster: Cluster, spec_path: Path | str | None, extra_args: list[str] | None = None,
                output: str = "text", detailed_exitcode: bool = False) -> int:
    """Print the plan; with `detailed_exitcode` return 2 when changes are pending."""
    require_deployable(cluster)
    path = Path(spec_path or cluster.source or "")
    plan = compute_plan(path, extra_args, launch_for(cluster, path), cluster)
    print(render_plan_json(plan) if output == "json" else render_plan(plan))
    return EXIT_CHANGES_PENDING if detailed_exitcode and plan.has_changes else 0


def apply_remote(cluster: Cluster, spec_path: Path | str | None, extra_args: list[str] | None = None) -> int:
    require_deployable(cluster)
    path = Path(spec_path or cluster.source or "")
    launch = launch_for(cluster, path)
    plan = compute_plan(path, extra_args, launch, cluster)
    print(render_plan(plan))
    if not plan.has_changes:
        return 0
    print("\nApplying with ansible-playbook (site.yml) ...", flush=True)
    code, recorded, _ = run_playbook(path, check=False, extra_args=extra_args, live_output=True, launch=launch)
    if code != 0:
        detail = _failure_detail(cluster, path, recorded, "") if recorded.get("failures") else ""
        raise DeployError(f"ansible-playbook failed (exit {code})" + (f":\n{detail}" if detail else ""))
    print("Apply complete.")
    return 0


@dataclass
class RemoteNodeStatus:
    node: str
    reached: bool  # Ansible reached the host
    http_status: int | None  # None: nothing answered on the node's /health
    health: dict | None
    error: str = ""

    @property
    def healthy(self) -> bool:
        return self.http_status == 200 and self.health is not None and self.health.get("status") == "ok"


def collect_remote_status(cluster: Cluster, spec_path: Path, extra_args: list[str] | None = None) -> list[RemoteNodeStatus]:
    """Every node's /health, read on its own host through status.yml."""
    with tempfile.TemporaryDirectory(prefix="marmot-status-") as scratch:
        code, recorded, output = run_playbook(
            spec_path, check=False, extra_args=[*(extra_args or []), "-e", f"marmot_status_dir={scratch}"],
            playbook="status.yml", launch=launch_for(cluster, spec_path, prepare=False),
        )
        if code not in (0, 4) and not any(Path(scratch).iterdir()):  # 4: some hosts unreachable
            raise DeployError(f"the status run failed (ansible-playbook exit {code}):\n{output[-3000:]}")
        statuses = []
        for node in sorted(cluster.nodes, key=lambda n: n.id):
            path = Path(scratch) / f"{node.name}.json"
            if not path.is_file():
                statuses.append(RemoteNodeStatus(node.name, False, None, None, "host not reached"))
                continue
            data = json.loads(path.read_text())
            http_status = data.get("http_status")
            statuses.append(RemoteNodeStatus(
                node.name, True, http_status if http_status and http_status > 0 else None, data.get("health"),
                data.get("error") or "",
            ))
        return statuses


def render_remote_status(statuses: list[RemoteNodeStatus]) -> str:
    lines = [f"{'NODE':<16} {'STATE':<11} {'NATS':<6} {'LAG':>6} {'PENDING':>8} {'DEAD':>5}  DETAIL"]
    for status in statuses:
        health = status.health or {}
        if not status.reached:
            state, detail = "unreachable", status.error
        elif status.http_status is None:
            state, detail = "down", f"/health does not answer: {status.error}"
        else:
            said = health.get("status")
            # "starting" / "restoring" (a snapshot restore inside the node) are shown as such.
            state = "healthy" if status.healthy else (said if said in ("starting", "restoring") else "unhealthy")
            failed = health.get("failed_parts") or {}
            database = health.get("database") or {}
            detail = "; ".join(filter(None, [
                status.error,
                # The node's own reason names every problem; older nodes lack it.
                health.get("reason") or database.get("error") or "",
                ", ".join(f"{part}: {why}" for part, why in failed.items()),
                "" if health.get("started", True) or health.get("reason") else "starting",
            ]))
        nats_ok = (health.get("nats") or {}).get("connected")
        lag = sum((health.get("lag") or {}).values()) if health else ""
        lines.append(
            f"{status.node:<16} {state:<11} {('yes' if nats_ok else 'no') if health else '-':<6} "
            f"{lag if health else '-':>6} {health.get('pending_rows', '-') if health else '-':>8} "
            f"{health.get('dead_letters', '-') if health else '-':>5}  {detail}"
        )
    return "\n".join(lines)


def status_remote(cluster: Cluster, spec_path: Path | str | None, extra_args: list[str] | None = None,
                  output: str = "text") -> int:
    """Print every node's health; 0 when all are healthy, 1 otherwise."""
    from marmot_appliance.schema.drift import declared_fingerprints, schema_drift

    statuses = collect_remote_status(cluster, Path(spec_path or cluster.source or ""), extra_args)
    # Tables/views differing from the spec or between nodes: reported, not unhealthy (docs/schema.md).
    drift = schema_drift({s.node: (s.health or {}).get("schema") or None for s in statuses},
                         declared_fingerprints(cluster.schema))
    if output == "json":
        print(json.dumps([{"node": s.node, "healthy": s.healthy, "reached": s.reached, "http_status": s.http_status,
                           "health": s.health, "error": s.error, "schema_drift": drift.get(s.node, [])}
                          for s in statuses], indent=2, sort_keys=True))
    else:
        print(render_remote_status(statuses))
        for node, lines in drift.items():
            for line in lines:
                print(f"schema drift on {node}: {line}")
    hint = unreachable_hint(cluster, Path(spec_path or cluster.source or ""), [s.node for s in statuses if not s.reached])
    if hint:
        print(hint.strip(), file=sys.stderr)
    return 0 if all(s.healthy for s in statuses) else 1


def destroy_remote(cluster: Cluster, spec_path: Path | str | None, purge: bool = False,
                   extra_args: list[str] | None = None) -> int:
    """Stop and disable the services on every host; --purge also removes appliance state."""
    path = Path(spec_path or cluster.source or "")
    args = [*(extra_args or []), "-e", f"marmot_destroy_purge={'true' if purge else 'false'}"]
    print(f"Stopping marmot-node and nats-server on {len(cluster.nodes)} host(s) ...", flush=True)
    code, recorded, output = run_playbook(path, check=False, extra_args=args, playbook="destroy.yml",
                                          launch=launch_for(cluster, path, prepare=False))
    if code != 0:
        detail = _failure_detail(cluster, path, recorded, output)
        raise DeployError(f"destroy failed (ansible-playbook exit {code}):\n{detail}")
    databases = ", ".join(sorted({f"{n.name}:{n.db}" for n in cluster.nodes}))
    print(("Destroyed; node state and JetStream stores removed." if purge else "Destroyed; data kept.")
          + f" Databases are never removed: {databases}")
    return 0
