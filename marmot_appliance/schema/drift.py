"""Schema drift: which nodes' tables and views differ from the spec or from the other nodes.

Input is what each node reports on /health (`{"tables": {name: fingerprint}, "views": {...}}`,
schema/shape.py), or the same read from the databases by `plan`. A node is named when one of
its objects differs from the declared schema (when the spec has one), or, for objects the spec
does not declare, from what most nodes have (someone ran DDL on one node by hand, or a rolling
change has not reached it yet).
"""

from __future__ import annotations

from collections import Counter

Fingerprints = dict[str, dict[str, str]]  # {"tables": {...}, "views": {...}}
_KINDS = (("tables", "table"), ("views", "view"))


def _lower(names: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {name.lower(): (name, fingerprint) for name, fingerprint in names.items()}


def declared_fingerprints(schema_files: tuple[str, ...]) -> Fingerprints | None:
    """The fingerprints of the spec's declared schema, as nodes report theirs (None: no `schema:`)."""
    if not schema_files:
        return None
    from .migrate import declared_schema

    shape = declared_schema(schema_files)
    return {"tables": shape.table_fingerprints(), "views": shape.view_fingerprints()}


def schema_drift(nodes: dict[str, Fingerprints | None], declared: Fingerprints | None = None) -> dict[str, list[str]]:
    """Node -> one line per object that differs. Nodes whose schema is unknown (None) are skipped."""
    known = {node: fingerprints for node, fingerprints in nodes.items() if isinstance(fingerprints, dict)}
    drift: dict[str, list[str]] = {node: [] for node in known}
    for key, kind in _KINDS:
        per_node = {node: _lower(fingerprints.get(key) or {}) for node, fingerprints in known.items()}
        wanted = _lower((declared or {}).get(key) or {})
        names = set(wanted) | {name for objects in per_node.values() for name in objects}
        for name in sorted(names):
            if name in wanted:
                shown, expected = wanted[name]
                for node, objects in per_node.items():
                    have = objects.get(name)
                    if have is None:
                        drift[node].append(f"{kind} {shown}: declared in the spec, missing here (apply creates it)")
                    elif have[1] != expected:
                        drift[node].append(f"{kind} {shown}: differs from the spec")
                continue
            values = {node: objects[name][1] if name in objects else None for node, objects in per_node.items()}
            if len(set(values.values())) <= 1:
                continue
            common, _count = Counter(values.values()).most_common(1)[0]
            shown = next(objects[name][0] for objects in per_node.values() if name in objects)
            for node, value in values.items():
                if value == common:
                    continue
                others = sorted(other for other, v in values.items() if v is not None and other != node)
                if value is None:
                    drift[node].append(f"{kind} {shown}: missing here (present on {', '.join(others)})")
                elif common is None:
                    missing = sorted(other for other, v in values.items() if v is None)
                    drift[node].append(f"{kind} {shown}: only here (missing on {', '.join(missing)})")
                else:
                    drift[node].append(f"{kind} {shown}: differs from the other nodes")
    return {node: lines for node, lines in drift.items() if lines}
