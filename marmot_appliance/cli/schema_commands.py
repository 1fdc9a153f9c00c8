"""`schema plan|apply SPEC [--node NAME]`: the declared schema on the databases of this machine.

`plan` and `apply` of a local spec do this for every node already; these commands are what the
Ansible role runs on each host, one host at a time (docs/schema.md), and what an operator runs
to look at or migrate one node by hand.

Exit codes: 0 done (plan: nothing to change), 1 error (apply: incompatible changes refused),
2 changes pending (plan --detailed-exitcode).
"""

from __future__ import annotations

import argparse
import json

from marmot_appliance.errors import MarmotError

EXIT_CHANGES_PENDING = 2


def _targets(args: argparse.Namespace) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    """(schema files, [(node name, database path)]) from SPEC [--node], or from --db and --schema
    (what the Ansible role passes: the files as the controller has them, in check mode too)."""
    if args.spec is None:
        if not args.db or not args.schema:
            raise MarmotError("give a cluster spec, or --db and --schema")
        from marmot_appliance.spec.schema_files import check_schema_files

        check_schema_files(args.schema)
        return tuple(args.schema), [(args.node or args.db, args.db)]
    if args.db or args.schema:
        raise MarmotError("--db and --schema replace the spec; give one or the other")
    from marmot_appliance.spec.loader import load_cluster

    cluster = load_cluster(args.spec)
    if not cluster.schema:
        raise MarmotError(f"{args.spec}: the spec declares no schema (no `schema:` files)")
    nodes = sorted(cluster.nodes, key=lambda node: node.id)
    if args.node is not None:
        nodes = [node for node in nodes if node.name == args.node]
        if not nodes:
            names = ", ".join(node.name for node in cluster.nodes)
            raise MarmotError(f"no node {args.node!r} in {args.spec} (nodes: {names})")
    return cluster.schema, [(node.name, node.db) for node in nodes]


def cmd_schema_plan(args: argparse.Namespace) -> int:
    from marmot_appliance.schema.migrate import declared_schema, plan_database

    files, nodes = _targets(args)
    declared = declared_schema(files)
    plans = {name: plan_database(declared, db) for name, db in nodes}
    if args.output == "json":
        print(json.dumps({node: [change.to_dict() for change in changes] for node, changes in plans.items()}, indent=2))
    else:
        for node, changes in plans.items():
            print(f"schema of node {node}:" + ("" if changes else " no changes"))
            for change in changes:
                print(f"  {change.render()}")
    pending = any(change.additive or change.incompatible for changes in plans.values() for change in changes)
    return EXIT_CHANGES_PENDING if args.detailed_exitcode and pending else 0


def cmd_schema_apply(args: argparse.Namespace) -> int:
    from marmot_appliance.schema.migrate import (
        IncompatibleSchemaError,
        SchemaMigrationError,
        declared_schema,
        migrate_database,
    )

    files, nodes = _targets(args)
    declared = declared_schema(files)
    for name, db in nodes:
        try:
            result = migrate_database(db, declared, skip_incompatible=args.skip_incompatible_schema)
        except IncompatibleSchemaError as exc:
            raise MarmotError(
                f"node {name}: {exc}\nMigrate these by hand (docs/schema.md), or pass "
                "--skip-incompatible-schema to apply the other changes and leave these as they are."
            ) from exc
        except SchemaMigrationError as exc:
            raise MarmotError(f"node {name}: {exc}") from exc
        if not result.applied and not result.skipped:
            print(f"schema of node {name}: no changes")
        for change in result.applied:
            print(f"schema of node {name}: {change.render()}")
        for change in result.skipped:
            print(f"schema of node {name}: left as it is: {change.render()}")
    return 0


def _target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="FILE", nargs="?", help="cluster spec (YAML)")
    parser.add_argument("--node", help="only this node (its database must be on this machine)")
    parser.add_argument("--db", metavar="PATH", help="a database, instead of the spec's nodes")
    parser.add_argument("--schema", metavar="SQL", action="append",
                        help="with --db: a schema file (repeat, in order), instead of the spec's")


def register(subparsers) -> None:
    schema = subparsers.add_parser(
        "schema",
        help="plan or apply the spec's declared schema on this machine's databases",
        description="Compare (plan) or migrate additively (apply) the databases of the spec's nodes "
        "with its declared schema (`schema:` files). For a node on another host, run it there "
        "with --node; the Ansible role does. See docs/schema.md.",
    )
    commands = schema.add_subparsers(dest="schema_command", metavar="SUBCOMMAND")
    schema.set_defaults(func=lambda _args: (schema.print_help(), 1)[1])
    plan = commands.add_parser("plan", help="show each node's differences from the declared schema")
    _target_arguments(plan)
    plan.add_argument("--output", choices=("text", "json"), default="text", help="output format")
    plan.add_argument("--detailed-exitcode", action="store_true", help="exit 2 when changes are pending")
    plan.set_defaults(func=cmd_schema_plan)
    apply = commands.add_parser("apply", help="create what the databases lack, one transaction per node")
    _target_arguments(apply)
    apply.add_argument(
        "--skip-incompatible-schema", action="store_true",
        help="apply the additive changes and leave incompatible ones as they are (nothing is ever dropped)",
    )
    apply.set_defaults(func=cmd_schema_apply)
