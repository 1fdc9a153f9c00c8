"""`marmot-appliance node`: run one node's replication runtime.

Two ways to say which node:

    marmot-appliance node --spec cluster.yaml --node n1 [--state-dir DIR]
    marmot-appliance node -nats-url nats://127.0.0.1:4222 -node-id 1 -db-path /tmp/cache-1.db

The second form keeps the seed's (Marmot's) flags working, single or double dash, with
`-flag=value` and Go-style booleans (`-enable-snapshot=false`).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from marmot_appliance.cli.options import non_negative_int
from marmot_appliance.errors import MarmotError
from marmot_appliance.node import config as node_config

_TRUE = {"1", "true", "t", "yes", "on"}
_FALSE = {"0", "false", "f", "no", "off"}


def _go_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")



def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Register --name and the seed's -name spelling."""
    parser.add_argument(f"--{name}", f"-{name}", **kwargs)


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str, default: bool | None) -> None:
    _flag(parser, name, nargs="?", const=True, default=default, type=_go_bool, metavar="BOOL", help=help)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "node",
        help="run one node's replication runtime",
        description="Run one node: capture local changes, publish them, apply the other nodes' changes.",
    )
    spec = parser.add_argument_group("from a cluster spec")
    spec.add_argument("--spec", metavar="FILE", help="cluster spec (cluster.yaml)")
    spec.add_argument("--node", metavar="NAME", help="which node of the spec this process runs")
    spec.add_argument("--state-dir", metavar="DIR", help="state directory (generated NATS credentials)")

    seed = parser.add_argument_group("from the seed's flags (no spec)")
    _flag(seed, "db-path", metavar="PATH", help=f"SQLite database (default {node_config.SEED_DB_PATH})")
    _flag(seed, "node-id", type=non_negative_int, metavar="N", help="unique positive node id (required without --spec)")
    _flag(seed, "nats-url", metavar="URLS", help=f"comma-separated NATS URLs (default {node_config.SEED_NATS_URL})")
    _flag(seed, "shards", type=non_negative_int, metavar="N", help=f"shard streams (default {node_config.SEED_SHARDS})")
    _flag(seed, "max-log-entries", type=non_negative_int, metavar="N",
          help=f"messages kept per stream (default {node_config.SEED_MAX_LOG_ENTRIES})")
    _flag(seed, "log-replicas", type=non_negative_int, metavar="N",
          help=f"stream replicas (default {node_config.SEED_LOG_REPLICAS})")
    _flag(seed, "subject-prefix", metavar="P", help=f"default {node_config.SEED_SUBJECT_PREFIX}")
    _flag(seed, "stream-prefix", metavar="P", help=f"default {node_config.SEED_STREAM_PREFIX}")
    _flag(seed, "metrics-port", type=non_negative_int, metavar="PORT",
          help="serve /health and /metrics on this port (flag mode: off unless given)")
    _flag(seed, "metrics-listen", default="127.0.0.1", metavar="ADDR", help="address for /health and /metrics")

    common = parser.add_argument_group("either way")
    _flag(common, "seq-map-path", metavar="PATH", help="also keep a CBOR copy of applied positions here")
    _bool_flag(common, "verbose", "debug logging", False)
    _bool_flag(common, "cleanup", "remove triggers, change log and bookkeeping tables, then exit", False)
    _bool_flag(common, "save-snapshot", "save a snapshot to NATS, then exit", False)
    _bool_flag(common, "enable-snapshot", "save and restore snapshots (default true)", None)
    _flag(common, "log-format", choices=("console", "json"), help="log lines (default: spec's, else console)")
    _flag(common, "no-inotify", action="store_true", help="wake on PRAGMA data_version polling only")
    _flag(common, "allow-node-id-change", action="store_true",
          help="run on a database that belonged to another node id (refused without this flag); "
               "its unpublished rows are published under this node's id")
    parser.set_defaults(func=run_node_command)


SEED_ONLY = ("db_path", "node_id", "nats_url", "shards", "max_log_entries", "log_replicas",
             "subject_prefix", "stream_prefix", "metrics_port")


def build_config(args: argparse.Namespace) -> node_config.NodeConfig:
    if args.spec or args.node:
        if not (args.spec and args.node):
            raise MarmotError("--spec and --node go together")
        mixed = [name.replace("_", "-") for name in SEED_ONLY if getattr(args, name) is not None]
        if mixed:
            raise MarmotError(f"with --spec, set these in the spec instead of flags: --{', --'.join(mixed)}")
        from marmot_appliance.spec.loader import load_cluster

        cluster = load_cluster(Path(args.spec), check_schema_files=False)  # the node never reads them
        config = node_config.config_from_spec(
            cluster,
            args.node,
            state_dir=Path(args.state_dir) if args.state_dir else None,
            cleanup=args.cleanup,
            save_snapshot=args.save_snapshot,
            enable_snapshot=args.enable_snapshot,
            seq_map_path=args.seq_map_path,
        )
    else:
        if args.state_dir:
            raise MarmotError("--state-dir needs --spec")
        if args.node_id is None and not args.cleanup:
            raise MarmotError("give --spec FILE --node NAME, or the seed's flags with at least --node-id")
        config = node_config.config_from_flags(
            db_path=args.db_path or node_config.SEED_DB_PATH,
            node_id=args.node_id if args.node_id is not None else 1,
            nats_url=args.nats_url or node_config.SEED_NATS_URL,
            shards=args.shards if args.shards is not None else node_config.SEED_SHARDS,
            max_log_entries=args.max_log_entries if args.max_log_entries is not None else node_config.SEED_MAX_LOG_ENTRIES,
            log_replicas=args.log_replicas if args.log_replicas is not None else node_config.SEED_LOG_REPLICAS,
            subject_prefix=args.subject_prefix or node_config.SEED_SUBJECT_PREFIX,
            stream_prefix=args.stream_prefix or node_config.SEED_STREAM_PREFIX,
            seq_map_path=args.seq_map_path,
            enable_snapshot=args.enable_snapshot if args.enable_snapshot is not None else True,
            cleanup=args.cleanup,
            save_snapshot=args.save_snapshot,
            metrics_host=args.metrics_listen,
            metrics_port=args.metrics_port,
        )
    from dataclasses import replace

    if args.no_inotify:
        config = replace(config, use_inotify=False)
    if args.allow_node_id_change:
        config = replace(config, allow_node_id_change=True)
    return config


def run_node_command(args: argparse.Namespace) -> int:
    from marmot_appliance.node.runtime import run_until_signal
    from marmot_appliance.observability.logging import configure_logging

    config = build_config(args)
    observability = config.cluster.observability
    level = "debug" if args.verbose else observability.log_level
    configure_logging(args.log_format or observability.log_format, level, node=config.node.name)
    return asyncio.run(run_until_signal(config))
