"""`plan` and `apply` for specs whose nodes live on other hosts: drive ansible/site.yml.

plan   runs the playbook in check mode with --diff; the marmot_plan callback records every task
       that would change, and this module prints them per host, Terraform style.
apply  shows that plan, then runs the playbook for real; with nothing to change it says
       "No changes." and touches nothing.
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
from marmot_appliance.spec.model import Cluster

PLAYBOOK_TIMEOUT_S = 3600.0


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
                 live_output: bool = False) -> tuple[int, dict, str]:
    """Run site.yml against the spec; returns (exit code, recorded plan JSON, captured output)."""
    directory = ansible_dir()
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
            }
        )
        command = [_ansible_playbook(), "-i", str(spec_path), str(directory / "site.yml"), *(extra_args or [])]
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


def compute_plan(spec_path: Path, extra_args: list[str] | None = None) -> RemotePlan:
    code, recorded, output = run_playbook(spec_path, check=True, extra_args=extra_args)
    plan = RemotePlan(
        changes={host: [t for t in tasks if t["status"] == "changed"] for host, tasks in recorded.get("hosts", {}).items()},
        failures=recorded.get("failures", []),
    )
    if code != 0 or plan.failures:
        detail = "\n".join(f"  {f['host']}: {f['task']}: {f['msg']}" for f in plan.failures) or output[-3000:]
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


def plan_remote(cluster: Cluster, spec_path: Path | str | None, extra_args: list[str] | None = None) -> int:
    path = Path(spec_path or cluster.source or "")
    plan = compute_plan(path, extra_args)
    print(render_plan(plan))
    return 0


def apply_remote(cluster: Cluster, spec_path: Path | str | None, extra_args: list[str] | None = None) -> int:
    path = Path(spec_path or cluster.source or "")
    plan = compute_plan(path, extra_args)
    print(render_plan(plan))
    if not plan.has_changes:
        return 0
    print("\nApplying with ansible-playbook (site.yml) ...", flush=True)
    code, recorded, _ = run_playbook(path, check=False, extra_args=extra_args, live_output=True)
    if code != 0:
        failures = recorded.get("failures", [])
        detail = "\n".join(f"  {f['host']}: {f['task']}: {f['msg']}" for f in failures)
        raise DeployError(f"ansible-playbook failed (exit {code})" + (f":\n{detail}" if detail else ""))
    print("Apply complete.")
    return 0
