"""The declared schema on a local cluster's nodes: plan per node, then migrate node by node.

Each node's database is migrated in its own transaction (marmot_appliance.schema.migrate), in
node-id order, while the node runtimes and applications keep running; while the nodes differ,
rows for a table or column a node lacks are parked there until its migration (docs/schema.md).
"""

from __future__ import annotations

from marmot_appliance.appliance.errors import ApplianceError
from marmot_appliance.appliance.progress import Progress
from marmot_appliance.schema.diff import SchemaChange
from marmot_appliance.schema.migrate import SchemaMigrationError, declared_schema, migrate_database, plan_database
from marmot_appliance.spec.model import Cluster


def _nodes_in_order(cluster: Cluster):
    return sorted(cluster.nodes, key=lambda node: node.id)


def plan_schema(cluster: Cluster) -> dict[str, list[SchemaChange]]:
    """Node name -> its database's differences from the declared schema ({} without `schema:`)."""
    if not cluster.schema:
        return {}
    declared = declared_schema(cluster.schema)
    try:
        return {node.name: plan_database(declared, node.db) for node in _nodes_in_order(cluster)}
    except SchemaMigrationError as exc:
        raise ApplianceError(str(exc)) from exc


def database_drift(cluster: Cluster) -> dict[str, list[str]]:
    """Node -> tables and views whose schema differs between the nodes' databases (read
    directly, as plan does), for specs without `schema:`; with one, the plan itself names them."""
    from marmot_appliance.schema.drift import schema_drift
    from marmot_appliance.schema.migrate import database_shape

    shapes: dict[str, dict[str, dict[str, str]] | None] = {}
    for node in _nodes_in_order(cluster):
        try:
            shape = database_shape(node.db)
        except SchemaMigrationError:
            shapes[node.name] = None  # unreadable: apply's preflight says why
            continue
        shapes[node.name] = {"tables": shape.table_fingerprints(), "views": shape.view_fingerprints()}
    return schema_drift(shapes)


def refuse_incompatible(schema_plan: dict[str, list[SchemaChange]]) -> None:
    lines = [
        f"  node {node}: {change.render()}"
        for node, changes in schema_plan.items()
        for change in changes
        if change.incompatible
    ]
    if lines:
        raise ApplianceError(
            "the declared schema has changes apply does not make (nothing was changed):\n" + "\n".join(lines)
            + "\nMigrate these by hand (docs/schema.md), or run apply with --skip-incompatible-schema to "
            "apply the other changes and leave these as they are."
        )


def migrate_nodes(cluster: Cluster, skip_incompatible: bool, progress: Progress) -> None:
    if not cluster.schema:
        return
    declared = declared_schema(cluster.schema)
    for node in _nodes_in_order(cluster):
        try:
            result = migrate_database(node.db, declared, skip_incompatible=skip_incompatible)
        except SchemaMigrationError as exc:
            raise ApplianceError(f"node {node.name}: {exc}") from exc
        for change in result.applied:
            progress.say(f"  schema of node {node.name}: {change.render()}")
        for change in result.skipped:
            progress.say(f"  schema of node {node.name}: left as it is: {change.render()}")
