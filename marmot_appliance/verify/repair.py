"""`repair`: settle every diverged key from the node holding its right copy, then verify again.

Which copy is right, per diverged key (verify/compare.py found it), among the nodes holding
the newest (version, origin):
  - the newest write was a delete (some node records a tombstone at that version): the
    tombstone, sent by a node where the row is indeed gone;
  - otherwise the row image most of them hold (ties: the lowest node id). A row is never
    dropped for lack of a version: when no node has any version for a key (rows written
    around capture), the present row wins over an absence.
That node re-publishes the row or tombstone with its original version (verify/republish.py),
and ordinary last-writer-wins apply settles every copy. Keys only catching up are left alone:
they settle by themselves.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from marmot_appliance.verify import protocol
from marmot_appliance.verify.client import NodeInfo, VerifyClient
from marmot_appliance.verify.compare import (
    DIVERGED,
    Deadline,
    KeyFinding,
    VerifyReport,
    verify_cluster,
    wait_streams_applied,
)

KEYS_PER_REPUBLISH = 1000
SETTLE_POLL_S = 0.5


@dataclass
class TableRepair:
    table: str
    diverged: int = 0
    published: int = 0
    moved_on: int = 0  # keys a newer write overtook meanwhile (they settle by themselves)
    unrepairable: list[str] = field(default_factory=list)  # why, per key that has no right copy


@dataclass
class RepairOutcome:
    before: VerifyReport
    after: VerifyReport | None
    tables: list[TableRepair]
    # seconds spent: "verify_before", "republish", "applied" (until every node applied the
    # streams past the repair), "verify_after"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        report = self.after or self.before
        return report.exit_code


def choose_source(finding: KeyFinding, ids: dict[str, int]) -> str | None:
    """The node whose copy of the key every node should hold, or None when none is clean."""
    at_newest = {name: s for name, s in finding.states.items() if (s.version, s.origin) == finding.newest}
    by_id = sorted(at_newest, key=lambda name: ids.get(name, 1 << 62))
    if any(s.deleted for s in at_newest.values()):
        clean = [name for name in by_id if at_newest[name].deleted and at_newest[name].row_hash is None]
        return clean[0] if clean else None
    present = Counter(s.row_hash for s in at_newest.values() if s.row_hash is not None)
    if not present:
        return None
    best = max(present.values())
    # Most common image; among equally common ones, the one the lowest node id holds.
    for name in by_id:
        row_hash = at_newest[name].row_hash
        if row_hash is not None and present[row_hash] == best:
            return name
    return None


def needs_fresh_version(finding: KeyFinding, floor: int) -> bool:
    """Must the key travel as a new write? Yes when some node has to record its newest version
    (it holds an older one, or none) and that version lies at or below a node's tombstone
    horizon: the applier drops such rows as stale (docs/capture.md). Nodes that already record
    the newest version only need the image rewritten, which the original version does."""
    version = finding.newest[0]
    behind = any((s.version, s.origin) != finding.newest for s in finding.states.values())
    # Version 0 means "no version recorded" (rows written around capture): no receiver records
    # it, so the image can only travel as a new write.
    return version == 0 or (behind and version <= floor)


async def _highest_horizon(client: VerifyClient, nodes: list[NodeInfo]) -> int:
    answers = await asyncio.gather(*(client.request(node.id, {"op": protocol.OP_PROGRESS}) for node in nodes))
    return max((int(a.get("horizon") or 0) for a in answers), default=0)


async def repair_cluster(client: VerifyClient, expected: list[tuple[str, int]] | None, tables: list[str] | None,
                         timeout_s: float, buckets: int, discover_s: float = 2.0,
                         expect_count: int | None = None) -> RepairOutcome:
    loop = asyncio.get_running_loop()
    clock = loop.time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = loop.time()
        timings[name] = round(now - clock, 3)
        clock = now

    before = await verify_cluster(client, expected, tables, timeout_s, buckets, discover_s, expect_count)
    lap("verify_before")
    repairs = []
    ids = {node.name: node.id for node in before.nodes}
    for result in before.tables:
        if result.status != DIVERGED:
            continue
        repair = TableRepair(result.table, diverged=len(result.findings))
        by_source: dict[str, list[KeyFinding]] = {}
        for finding in result.findings:
            source = choose_source(finding, ids)
            if source is None:
                repair.unrepairable.append(f"key {list(finding.key)!r}: no node holds a clean copy of version "
                                           f"{finding.newest}")
                continue
            by_source.setdefault(source, []).append(finding)
        floor = await _highest_horizon(client, [n for n in before.nodes if n.replicate])
        for source, findings in sorted(by_source.items()):
            for start in range(0, len(findings), KEYS_PER_REPUBLISH):
                chunk = findings[start:start + KEYS_PER_REPUBLISH]
                answer = await client.request(ids[source], {
                    "op": protocol.OP_REPUBLISH, "table": result.table, "keys": [list(f.key) for f in chunk],
                    "expected": [list(f.newest) for f in chunk],
                    "fresh": [needs_fresh_version(f, floor) for f in chunk], "floor": floor,
                })
                repair.published += int(answer.get("published", 0))
                repair.moved_on += int(answer.get("moved_on", 0))
                if answer.get("no_image"):
                    repair.unrepairable.append(f"{answer['no_image']} key(s): {source} no longer holds the copy")
        repairs.append(repair)
    lap("republish")
    if not repairs:
        return RepairOutcome(before, None, repairs, timings)
    # The re-published rows travel through the streams like any change: once every node applied
    # the streams past them, verify (again until converged, should writes interleave).
    deadline = loop.time() + timeout_s
    await wait_streams_applied(client, [n for n in before.nodes if n.replicate], Deadline(timeout_s))
    lap("applied")
    repaired_tables = [r.table for r in repairs]
    while True:
        after = await verify_cluster(client, expected, repaired_tables, max(1.0, deadline - loop.time()), buckets,
                                     discover_s, expect_count)
        if after.exit_code != 1 or loop.time() >= deadline:
            break
        await asyncio.sleep(SETTLE_POLL_S)
    lap("verify_after")
    untouched = [t for t in before.tables if t.table not in repaired_tables]
    after.tables = sorted([*untouched, *after.tables], key=lambda t: t.table)
    return RepairOutcome(before, after, repairs, timings)


def repair_to_text(outcome: RepairOutcome) -> str:
    from marmot_appliance.verify.report import report_to_text

    lines = []
    if not outcome.tables:
        lines.append("nothing to repair")
    for r in outcome.tables:
        lines.append(f"{r.table}: {r.diverged} diverged key(s), {r.published} re-published with their original versions"
                     + (f", {r.moved_on} overtaken by newer writes" if r.moved_on else ""))
        lines.extend(f"  cannot repair {why}" for why in r.unrepairable)
    lines.append("after repair:" if outcome.after else "verify:")
    lines.append(report_to_text(outcome.after or outcome.before))
    return "\n".join(lines)


def repair_to_json(outcome: RepairOutcome) -> str:
    import json

    from marmot_appliance.verify.report import report_to_json

    return json.dumps({
        "repaired": [r.__dict__ for r in outcome.tables],
        "before": json.loads(report_to_json(outcome.before)),
        "after": json.loads(report_to_json(outcome.after)) if outcome.after else None,
        "timings": outcome.timings,
        "exit_code": outcome.exit_code,
    }, indent=2)
