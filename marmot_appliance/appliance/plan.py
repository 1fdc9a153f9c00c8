"""Compare what the spec asks for with what runs, per resource: + create, ~ restart, - remove.

`compute_plan` is the one code path behind both `plan` and `apply`, so what `plan` shows is
what `apply` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from marmot_appliance.appliance.resources import NATS_CONFIG_FACET, NODE_KIND, DesiredResource, digest, kind_of
from marmot_appliance.appliance.state import ProcessRecord, RecordedState
from marmot_appliance.appliance.supervisor import is_running

Action = Literal["create", "update", "delete"]
SYMBOLS: dict[str, str] = {"create": "+", "update": "~", "delete": "-"}


@dataclass(frozen=True)
class ResourceChange:
    resource: str
    action: Action
    reasons: tuple[str, ...]
    desired: DesiredResource | None = field(default=None, repr=False, compare=False)
    recorded: ProcessRecord | None = field(default=None, repr=False, compare=False)
    running: bool = False  # the recorded process is alive now (a restart interrupts it)

    @property
    def kind(self) -> str:
        return kind_of(self.resource)

    def to_dict(self) -> dict:
        return {"resource": self.resource, "action": self.action, "reasons": list(self.reasons)}


@dataclass
class Plan:
    cluster: str
    state_dir: Path
    changes: list[ResourceChange] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # recorded, not in spec, kept (no --prune)

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def count(self, action: Action) -> int:
        return sum(1 for change in self.changes if change.action == action)

    def to_dict(self) -> dict:
        return {
            "cluster": self.cluster,
            "state_dir": str(self.state_dir),
            "has_changes": self.has_changes,
            "changes": [change.to_dict() for change in self.changes],
            "unchanged": list(self.unchanged),
            "orphans": list(self.orphans),
        }


def _config_file_problem(desired: DesiredResource, recorded: ProcessRecord) -> str | None:
    """The config file on disk is not the one the running process was started with."""
    if desired.config_path is None or NATS_CONFIG_FACET not in recorded.facets:
        return None
    try:
        on_disk = desired.config_path.read_text()
    except FileNotFoundError:
        return "config file missing"
    except OSError as exc:
        return f"config file unreadable ({exc.strerror})"
    if digest(on_disk) != recorded.facets[NATS_CONFIG_FACET]:
        return "config file modified on disk"
    return None


def _change_reasons(desired: DesiredResource, recorded: ProcessRecord) -> list[str]:
    reasons = [
        f"{facet} changed"
        for facet, value in desired.facets.items()
        if recorded.facets.get(facet) != value
    ]
    if not reasons and recorded.config_hash != desired.config_hash:
        reasons.append("configuration changed")
    problem = _config_file_problem(desired, recorded)
    if problem:
        reasons.append(problem)
    return reasons


def compute_plan(
    cluster_name: str,
    state_dir: Path,
    desired: list[DesiredResource],
    recorded: RecordedState,
    prune: bool,
    running: Callable[[ProcessRecord], bool] = is_running,
) -> Plan:
    plan = Plan(cluster=cluster_name, state_dir=state_dir)
    wanted = {resource.name for resource in desired}
    for resource in desired:
        record = recorded.processes.get(resource.name)
        if record is None:
            plan.changes.append(ResourceChange(resource.name, "create", ("new",), desired=resource))
            continue
        alive = running(record)
        reasons = [] if alive else ["not running"]
        reasons += _change_reasons(resource, record)
        if reasons:
            plan.changes.append(
                ResourceChange(
                    resource.name, "update", tuple(reasons), desired=resource, recorded=record, running=alive
                )
            )
        else:
            plan.unchanged.append(resource.name)
    # Removed from the spec: node runtimes go before the nats-servers they talk to.
    leftovers = sorted(
        (name for name in recorded.processes if name not in wanted),
        key=lambda name: (kind_of(name) != NODE_KIND, name),
    )
    for name in leftovers:
        record = recorded.processes[name]
        alive = running(record)
        if prune:
            reason = "removed from the spec" + ("" if alive else " (not running)")
            plan.changes.append(ResourceChange(name, "delete", (reason,), recorded=record, running=alive))
        elif alive:
            plan.orphans.append(name)
    return plan


def render_plan_text(plan: Plan) -> str:
    lines: list[str] = []
    if plan.has_changes:
        width = max(len(change.resource) for change in plan.changes)
        lines.append(f"Plan for cluster {plan.cluster!r} (state in {plan.state_dir}):")
        for change in plan.changes:
            lines.append(
                f"  {SYMBOLS[change.action]} {change.resource.ljust(width)}  {', '.join(change.reasons)}"
            )
        lines.append(
            f"Plan: {plan.count('create')} to create, {plan.count('update')} to restart, "
            f"{plan.count('delete')} to remove."
        )
    else:
        lines.append("No changes.")
    for orphan in plan.orphans:
        lines.append(
            f"Note: {orphan} is no longer in the spec but keeps running; `apply --prune` stops it."
        )
    return "\n".join(lines)


def render_plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2)
