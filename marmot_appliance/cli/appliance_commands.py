"""`plan`, `apply`, `status`, `destroy`: thin wrappers over marmot_appliance.appliance.

Specs whose nodes all run on this machine are handled locally (background processes under the
state directory); specs with remote hosts go to marmot_appliance.deploy.remote (Ansible).

Exit codes: 0 success (plan: no changes), 1 error (status: a node unhealthy),
2 changes pending (plan --detailed-exitcode only).
"""

from __future__ import annotations

import argparse
import functools
from typing import Callable

from marmot_appliance.cli.options import positive_seconds
from marmot_appliance.errors import MarmotError
from marmot_appliance.spec.model import Cluster

EXIT_CHANGES_PENDING = 2


def _environment_errors_as_messages(handler: Callable[[argparse.Namespace], int]):
    """A file the appliance cannot write or read (permissions, full disk) is the environment's
    problem, not a bug: report it as one line naming the file, not as a traceback."""

    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise MarmotError(f"{where}{exc.strerror or exc}") from exc

    return wrapper


def _load(path: str) -> Cluster:
    from marmot_appliance.spec.loader import load_cluster

    return load_cluster(path)


def _remote():
    """The Ansible path, imported only for specs with other hosts (keeps local commands light).

    The CLI picks between the two packages so that deploy may build on appliance (credentials,
    state) and appliance never reaches back into deploy.
    """
    from marmot_appliance.deploy import remote

    return remote


@_environment_errors_as_messages
def cmd_plan(args: argparse.Namespace) -> int:
    from marmot_appliance.appliance.apply import plan_local
    from marmot_appliance.appliance.plan import render_plan_json, render_plan_text

    cluster = _load(args.spec)
    if not cluster.is_local:
        return int(_remote().plan_remote(
            cluster, cluster.source, output=args.output, detailed_exitcode=args.detailed_exitcode) or 0)
    plan = plan_local(cluster, prune=args.prune)
    print(render_plan_json(plan) if args.output == "json" else render_plan_text(plan))
    if args.detailed_exitcode and plan.has_changes:
        return EXIT_CHANGES_PENDING
    return 0


@_environment_errors_as_messages
def cmd_apply(args: argparse.Namespace) -> int:
    from marmot_appliance.appliance.apply import ApplyOptions, apply_local

    cluster = _load(args.spec)
    if not cluster.is_local:
        return int(_remote().apply_remote(cluster, cluster.source) or 0)
    apply_local(cluster, ApplyOptions(
        prune=args.prune, health_timeout_s=args.timeout, skip_incompatible_schema=args.skip_incompatible_schema))
    return 0


@_environment_errors_as_messages
def cmd_status(args: argparse.Namespace) -> int:
    from marmot_appliance.appliance.status import collect_status, render_status_json, render_status_text

    cluster = _load(args.spec)
    if not cluster.is_local:
        return int(_remote().status_remote(cluster, cluster.source, output=args.output) or 0)
    statuses = collect_status(cluster)
    print(render_status_json(cluster, statuses) if args.output == "json" else render_status_text(cluster, statuses))
    return 0 if all(status.healthy for status in statuses) else 1


@_environment_errors_as_messages
def cmd_destroy(args: argparse.Namespace) -> int:
    from marmot_appliance.appliance.destroy import destroy_local

    cluster = _load(args.spec)
    if not cluster.is_local:
        return int(_remote().destroy_remote(cluster, cluster.source, purge=args.purge) or 0)
    destroy_local(cluster, purge=args.purge)
    return 0



def register(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="show what apply would change (+ create, ~ restart, - remove)",
        description="Compare the spec with the running appliance and show the changes apply would make.",
        epilog="Exit codes: 0 no changes (or changes without --detailed-exitcode), 1 error, "
        "2 changes pending (with --detailed-exitcode).",
    )
    plan.add_argument("spec", metavar="FILE", help="cluster spec (YAML)")
    plan.add_argument("--output", choices=("text", "json"), default="text", help="output format")
    plan.add_argument(
        "--detailed-exitcode", action="store_true", help="exit 2 when changes are pending (for CI)"
    )
    plan.add_argument("--prune", action="store_true", help="plan to stop resources removed from the spec")
    plan.set_defaults(func=cmd_plan)

    apply = subparsers.add_parser(
        "apply",
        help="converge the running appliance to the spec",
        description="Show the plan, then start, restart (one at a time) or stop processes until "
        "this machine runs what the spec says, and wait until every node is healthy.",
    )
    apply.add_argument("spec", metavar="FILE", help="cluster spec (YAML)")
    apply.add_argument("--prune", action="store_true", help="stop nodes that were removed from the spec")
    apply.add_argument(
        "--skip-incompatible-schema",
        action="store_true",
        help="apply the additive schema changes and leave incompatible ones (type or key changes, "
        "undeclared columns) as they are, instead of refusing; nothing is ever dropped",
    )
    apply.add_argument(
        "--timeout",
        type=positive_seconds,
        default=90.0,
        metavar="SECONDS",
        help="how long to wait for each process to become healthy (default 90)",
    )
    apply.set_defaults(func=cmd_apply)

    status = subparsers.add_parser(
        "status",
        help="health, lag and processes of every node",
        description="Show every node's processes and health. Exit 1 if any node is unhealthy.",
    )
    status.add_argument("spec", metavar="FILE", help="cluster spec (YAML)")
    status.add_argument("--output", choices=("text", "json"), default="text", help="output format")
    status.set_defaults(func=cmd_status)

    destroy = subparsers.add_parser(
        "destroy",
        help="stop every process (data kept unless --purge)",
        description="Stop node runtimes, then nats-servers. --purge also deletes the state directory "
        "(configs, credentials, JetStream data, logs); the SQLite databases are always kept.",
    )
    destroy.add_argument("spec", metavar="FILE", help="cluster spec (YAML)")
    destroy.add_argument("--purge", action="store_true", help="also delete the state directory")
    destroy.set_defaults(func=cmd_destroy)
