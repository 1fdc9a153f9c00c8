"""Render a verify report: text for people, JSON (`--output json`) for tools such as the chaos harness."""

from __future__ import annotations

import json
from typing import Any

from marmot_appliance.verify.compare import CONVERGED, KeyFinding, TableResult, VerifyReport

SAMPLE_KEYS = 5


def key_to_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"blob": bytes(value).hex()}
    return value


def _key_text(key: tuple) -> str:
    parts = [f"x'{bytes(v).hex()}'" if isinstance(v, (bytes, bytearray, memoryview)) else repr(v) for v in key]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def finding_to_json(finding: KeyFinding) -> dict:
    return {
        "key": [key_to_json(v) for v in finding.key],
        "reason": finding.reason,
        "newest": {"version": finding.newest[0], "origin": finding.newest[1]},
        "newest_nodes": finding.newest_nodes,
        "nodes": {
            name: {"version": s.version, "origin": s.origin, "deleted": s.deleted, "present": s.row_hash is not None,
                   "row_hash": s.row_hash.hex() if s.row_hash else None}
            for name, s in sorted(finding.states.items())
        },
    }


def table_to_json(result: TableResult, samples: int | None = None) -> dict:
    findings = result.findings if samples is None else result.findings[:samples]
    return {
        "table": result.table, "status": result.status, "nodes": result.nodes, "rows": result.rows,
        "differing_keys": result.differing_keys, "keys": [finding_to_json(f) for f in findings],
        "detail": result.detail,
    }


def report_to_json(report: VerifyReport) -> str:
    return json.dumps({
        "result": report.result,
        "exit_code": report.exit_code,
        "nodes": [{"name": n.name, "id": n.id, "replicate": n.replicate} for n in report.nodes],
        "unreachable": report.unreachable,
        "errors": report.errors,
        "tables": [table_to_json(t) for t in report.tables],
    }, indent=2)


def report_to_text(report: VerifyReport) -> str:
    lines = [f"nodes: {', '.join(n.name for n in report.nodes) or '(none answered)'}"]
    if report.unreachable:
        lines.append(f"unreachable: {', '.join(report.unreachable)}")
    lines.extend(f"error: {e}" for e in report.errors)
    for t in report.tables:
        rows = ", ".join(f"{name}={count}" for name, count in sorted(t.rows.items()))
        if t.status == CONVERGED:
            lines.append(f"{t.table}: converged ({rows or 'no rows'})")
            continue
        head = f"{t.table}: {t.status.replace('_', ' ')}"
        if t.differing_keys:
            head += f", {t.differing_keys} key(s) differ"
        lines.append(head + (f" ({rows})" if rows else "") + (f": {t.detail}" if t.detail else ""))
        for f in t.findings[:SAMPLE_KEYS]:
            per_node = "; ".join(
                f"{name} {'deleted ' if s.deleted else ''}{'absent' if s.row_hash is None else 'row ' + s.row_hash.hex()[:8]}"
                f" @({s.version}, {s.origin})"
                for name, s in sorted(f.states.items())
            )
            lines.append(f"  key {_key_text(f.key)}: {f.reason}; newest ({f.newest[0]}, {f.newest[1]}) on "
                         f"{', '.join(f.newest_nodes)}; {per_node}")
        if len(t.findings) > SAMPLE_KEYS:
            lines.append(f"  ... and {len(t.findings) - SAMPLE_KEYS} more (--output json lists all)")
    lines.append(f"result: {report.result}")
    return "\n".join(lines)
