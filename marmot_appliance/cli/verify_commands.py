"""`marmot-appliance verify` and `repair`: prove the nodes hold the same rows, and settle them if not.

    marmot-appliance verify cluster.yaml [--table T] [--timeout S] [--output json]
    marmot-appliance verify --nats-url nats://127.0.0.1:4222 [--stream-prefix P] [--expect-nodes N]

Exit codes of `verify`: 0 converged, 1 diverged, 2 could not decide (a node unreachable, still
catching up when --timeout ran out, or any other error: a usage error too, so a tool reading the
exit code never takes a typo for a divergence). See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

from marmot_appliance.cli.options import positive_int, positive_seconds
from marmot_appliance.errors import MarmotError, SpecError

EXIT_UNDECIDED = 2
DEFAULT_BUCKETS = 4096  # = verify.compare.DEFAULT_BUCKETS (not imported here: keeps the CLI start light)




def _target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", metavar="SPEC", help="cluster spec (cluster.yaml)")
    parser.add_argument("--state-dir", metavar="DIR", help="with SPEC: where generated NATS credentials live")
    seed = parser.add_argument_group("a flag-mode cluster (no spec)")
    seed.add_argument("--nats-url", "-nats-url", metavar="URLS", help="comma-separated NATS URLs")
    seed.add_argument("--stream-prefix", "-stream-prefix", metavar="P", help="stream prefix (default marmot-changes)")
    seed.add_argument("--expect-nodes", type=positive_int, metavar="N",
                      help="how many nodes must answer the discovery (fewer: exit 2)")
    seed.add_argument("--discover-s", type=positive_seconds, default=2.0, metavar="S",
                      help="how long to collect discovery answers (default 2; ends early once --expect-nodes answered)")
    parser.add_argument("--table", action="append", metavar="T", help="only this table (repeatable)")
    parser.add_argument("--timeout", type=positive_seconds, default=60.0, metavar="S",
                        help="give up waiting for lagging nodes after S seconds (default 60)")
    parser.add_argument("--buckets", type=positive_int, default=DEFAULT_BUCKETS, metavar="N",
                        help=f"digest buckets per table (default {DEFAULT_BUCKETS}; at most 65536)")


def register(subparsers) -> None:
    verify = subparsers.add_parser(
        "verify", help="compare every replicated table across the nodes (exit 0 converged, 1 diverged, 2 undecided)",
        description="Compare every replicated table across all nodes by bucketed digests; list the differing "
        "keys with each node's (version, origin). Exit 0 converged, 1 diverged, 2 could not decide.",
    )
    verify.usage_exit_code = EXIT_UNDECIDED
    _target_arguments(verify)
    verify.add_argument("--output", choices=("text", "json"), default="text", help="output format")
    verify.set_defaults(func=run_verify)

    repair = subparsers.add_parser(
        "repair", help="settle diverged keys: the node holding the right copy re-publishes it with its original version",
        description="Run verify; for every diverged key the node holding the newest copy re-publishes that row or "
        "its tombstone with its original version, so ordinary last-writer-wins apply settles every copy; then "
        "verify again. Exit 0 converged afterwards, 1 still diverged, 2 could not decide.",
    )
    repair.usage_exit_code = EXIT_UNDECIDED
    _target_arguments(repair)
    repair.add_argument("--output", choices=("text", "json"), default="text", help="output format")
    repair.set_defaults(func=run_repair)


@dataclass(frozen=True)
class VerifyTarget:
    connect: dict
    stream_prefix: str
    expected: list[tuple[str, int]] | None  # spec mode: every replicating node must answer


def resolve_target(args: argparse.Namespace) -> VerifyTarget:
    from marmot_appliance.nats_client import connect_kwargs
    from marmot_appliance.node.config import SEED_STREAM_PREFIX, split_nats_urls

    if args.spec:
        if args.nats_url or args.stream_prefix or args.expect_nodes:
            raise MarmotError("SPEC and the flag-mode options (--nats-url, --stream-prefix, --expect-nodes) do not mix")
        from marmot_appliance.spec.loader import load_cluster

        cluster = load_cluster(Path(args.spec))
        state_dir = Path(args.state_dir) if args.state_dir else None
        expected = [(node.name, node.id) for node in cluster.nodes if node.replicate]
        return VerifyTarget(connect_kwargs(cluster, None, state_dir), cluster.replication.stream_prefix, expected)
    if args.state_dir:
        raise MarmotError("--state-dir needs SPEC")
    if not args.nats_url:
        raise MarmotError("give a cluster SPEC, or --nats-url URLS for a flag-mode cluster")
    return VerifyTarget({"servers": list(split_nats_urls(args.nats_url))}, args.stream_prefix or SEED_STREAM_PREFIX,
                        None)


def _run(args: argparse.Namespace, check, to_json, to_text) -> int:
    """verify and repair alike: resolve the target, connect, run `check(client, ...)` (verify_cluster
    or repair_cluster), print its outcome; any error is one message and exit 2 (undecided)."""
    from marmot_appliance.nats_client import with_connection
    from marmot_appliance.verify.client import VerifyClient

    try:
        target = resolve_target(args)

        async def work(nc):
            client = VerifyClient(nc, target.stream_prefix, request_timeout_s=max(10.0, args.timeout))
            return await check(client, target.expected, args.table, args.timeout, args.buckets,
                               args.discover_s, args.expect_nodes)

        outcome = asyncio.run(with_connection(target.connect, work))
    except SpecError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_UNDECIDED
    except MarmotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNDECIDED
    print(to_json(outcome) if args.output == "json" else to_text(outcome))
    return outcome.exit_code


def run_verify(args: argparse.Namespace) -> int:
    from marmot_appliance.verify.compare import verify_cluster
    from marmot_appliance.verify.report import report_to_json, report_to_text

    return _run(args, verify_cluster, report_to_json, report_to_text)


def run_repair(args: argparse.Namespace) -> int:
    from marmot_appliance.verify.repair import repair_cluster, repair_to_json, repair_to_text

    return _run(args, repair_cluster, repair_to_json, repair_to_text)
