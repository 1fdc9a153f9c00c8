"""Compare what the spec asks for with what runs, per resource: + create, ~ restart, - remove;
and, with `schema:` in the spec, each node's database with the declared schema (docs/schema.md).

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
from marmot_appliance.schema.diff import SchemaChange

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
    # node -> its database's differences from the declared schema (empty without `schema:`)
    schema: dict[str, list[SchemaChange]] = field(default_factory=dict)
    # node -> tables/views that differ between the nodes (specs without `schema:`; a note only)
    schema_drift: dict[str, list[str]] = field(default_factory=dict)

    @property
    def schema_changes(self) -> int:
        return sum(1 for changes in self.schema.values() for change in changes if change.additive)

    @property
    def schema_incompatible(self) -> int:
        return sum(1 for changes in self.schema.values() for change in changes if change.incompatible)

    @property
    def has_changes(self) -> bool:
        return bool(self.changes) or self.schema_changes > 0 or self.schema_incompatible > 0

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
            "schema": {node: [change.to_dict() for change in changes] for node, changes in self.schema.items()},
            "schema_drift": {node: list(lines) for node, lines in self.schema_drift.items()},
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


def _schema_lines(plan: Plan) -> list[str]:
    """Per node: + create, ~ re-create, ! incompatible (refused), ? not declared (kept)."""
    lines = []
    for node, changes in plan.schema.items():
        if not changes:
            continue
        lines.append(f"  schema of node {node}:")
        lines.extend(f"    {change.render()}" for change in changes)
    return lines


def render_plan_text(plan: Plan) -> str:
    lines: list[str] = []
    schema_lines = _schema_lines(plan)
    if plan.has_changes:
        lines.append(f"Plan for cluster {plan.cluster!r} (state in {plan.state_dir}):")
        if plan.changes:
            width = max(len(change.resource) for change in plan.changes)
            for change in plan.changes:
                lines.append(
                    f"  {SYMBOLS[change.action]} {change.resource.ljust(width)}  {', '.join(change.reasons)}"
                )
        lines.extend(schema_lines)
        summary = (
            f"Plan: {plan.count('create')} to create, {plan.count('update')} to restart, "
            f"{plan.count('delete')} to remove"
        )
        if plan.schema:
            summary += f"; schema: {plan.schema_changes} change(s)"
            if plan.schema_incompatible:
                summary += f", {plan.schema_incompatible} incompatible (apply refuses them)"
        lines.append(summary + ".")
    else:
        lines.append("No changes.")
        lines.extend(schema_lines)  # only "?" notes: objects the schema files do not declare
    for node, drift in plan.schema_drift.items():
        for line in drift:
            lines.append(f"Note: the schema of node {node} differs: {line}.")
    for orphan in plan.orphans:
        lines.append(
            f"Note: {orphan} is no longer in the spec but keeps running; `apply --prune` stops it."
        )
    return "\n".join(lines)


def render_plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2)
