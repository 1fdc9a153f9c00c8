"""`marmot-appliance snapshot save|list|restore`: operate on the cluster's snapshots.

Which cluster and database, either from the spec or from the seed's flags:

    marmot-appliance snapshot save --spec cluster.yaml --node n1
    marmot-appliance snapshot list --nats-url nats://127.0.0.1:4222 [--stream-prefix P]
    marmot-appliance snapshot restore --nats-url nats://127.0.0.1:4222 --db-path app.db --node-id 2

Transfers show a progress meter on a terminal and stay quiet otherwise. `restore` is for a node
whose runtime is stopped and is refused while it runs (the lock beside the database, see
node/db_lock.py; a running node restores by itself when it must, see docs/snapshots.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from marmot_appliance.cli.options import positive_int
from marmot_appliance.errors import MarmotError
from marmot_appliance.snapshots.errors import SnapshotUpToDate

JS_TIMEOUT_S = 30.0



def _target_arguments(parser: argparse.ArgumentParser, needs_db: bool) -> None:
    spec = parser.add_argument_group("from a cluster spec")
    spec.add_argument("--spec", metavar="FILE", help="cluster spec (cluster.yaml)")
    spec.add_argument("--node", metavar="NAME", help="node of the spec" + ("" if needs_db else " (default: the first)"))
    spec.add_argument("--state-dir", metavar="DIR", help="state directory (generated NATS credentials)")
    seed = parser.add_argument_group("from the seed's flags (no spec)")
    seed.add_argument("--nats-url", "-nats-url", metavar="URLS", help="comma-separated NATS URLs")
    if needs_db:
        seed.add_argument("--db-path", "-db-path", metavar="PATH", help="the node's SQLite database")
        seed.add_argument("--node-id", "-node-id", type=positive_int, default=1, metavar="N", help="node id (default 1)")
    seed.add_argument("--stream-prefix", "-stream-prefix", metavar="P", help="stream prefix (default marmot-changes)")
    seed.add_argument("--shards", "-shards", type=positive_int, metavar="N", help="shard streams (default 8)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "snapshot", help="save, list or restore database snapshots",
        description="Snapshots of a node's database in the JetStream object store, tied to log positions.",
    )
    commands = parser.add_subparsers(dest="snapshot_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])

    save = commands.add_parser("save", help="save this node's database as the newest snapshot",
                               description="Save a consistent copy of the node's database to the object store.")
    _target_arguments(save, needs_db=True)
    save.add_argument("--force", action="store_true", help="save even if the newest snapshot is up to date")
    save.set_defaults(func=run_save)

    listing = commands.add_parser("list", help="list kept snapshots, newest first",
                                  description="List kept snapshots, newest first.")
    _target_arguments(listing, needs_db=False)
    listing.add_argument("--output", choices=("text", "json"), default="text", help="output format")
    listing.set_defaults(func=run_list)

    restore = commands.add_parser("restore", help="restore a snapshot into this node's database (node stopped)",
                                  description="Download, verify and restore a snapshot into the live database "
                                  "through SQLite's backup API.")
    _target_arguments(restore, needs_db=True)
    restore.add_argument("--name", metavar="SNAPSHOT", help="which snapshot (default: the newest that verifies)")
    restore.set_defaults(func=run_restore)


def _resolve(args: argparse.Namespace, needs_db: bool):
    """(cluster, node, connect kwargs) from the spec or from the seed's flags."""
    from marmot_appliance.node import config as node_config

    if args.spec:
        if args.nats_url or getattr(args, "db_path", None):
            raise MarmotError("--spec and the seed's flags (--nats-url, --db-path) do not mix")
        from marmot_appliance.spec.loader import load_cluster

        cluster = load_cluster(Path(args.spec))
        node_name = args.node or (None if needs_db else cluster.nodes[0].name)
        if node_name is None:
            raise MarmotError("--spec needs --node NAME: which node's database")
        state_dir = Path(args.state_dir) if args.state_dir else None
        config = node_config.config_from_spec(cluster, node_name, state_dir=state_dir)
        return config.cluster, config.node, config.nats_connect
    if args.node or args.state_dir:
        raise MarmotError("--node and --state-dir need --spec")
    if not args.nats_url:
        raise MarmotError("give --spec FILE --node NAME, or --nats-url URLS" + (" --db-path PATH" if needs_db else ""))
    db_path = getattr(args, "db_path", None)
    if needs_db and not db_path:
        raise MarmotError("--db-path is required with --nats-url")
    config = node_config.config_from_flags(
        db_path=db_path or node_config.SEED_DB_PATH,
        node_id=getattr(args, "node_id", 1),
        nats_url=args.nats_url,
        shards=args.shards or node_config.SEED_SHARDS,
        stream_prefix=args.stream_prefix or node_config.SEED_STREAM_PREFIX,
    )
    return config.cluster, config.node, config.nats_connect


async def _with_jetstream(connect_kwargs: dict, work):
    from marmot_appliance.nats_client import with_connection

    return await with_connection(connect_kwargs, lambda nc: work(nc.jetstream(timeout=JS_TIMEOUT_S)))


def _require_db(node) -> Path:
    path = Path(node.db)
    if not path.is_file():
        raise MarmotError(f"database {path} does not exist")
    return path


def run_save(args: argparse.Namespace) -> int:
    from marmot_appliance.snapshots import save_snapshot

    cluster, node, connect = _resolve(args, needs_db=True)
    db = _require_db(node)

    async def work(js):
        return await save_snapshot(js, cluster, node, db, force=args.force, show_progress=None)

    try:
        info = asyncio.run(_with_jetstream(connect, work))
    except SnapshotUpToDate as exc:
        print(str(exc))
        return 0
    print(f"saved {info.name}: {info.size} bytes, sha256 {info.sha256}, positions {_positions(info.positions)}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from marmot_appliance.snapshots import NoSnapshotError, open_store

    cluster, _node, connect = _resolve(args, needs_db=False)

    async def work(js):
        try:
            store = await open_store(js, cluster, create=False)
        except NoSnapshotError:
            return ()
        manifest, _revision = await store.read_manifest()
        return manifest.snapshots

    snapshots = asyncio.run(_with_jetstream(connect, work))
    if args.output == "json":
        print(json.dumps([s.to_dict() for s in snapshots], indent=2))
        return 0
    if not snapshots:
        print(f"no snapshots in bucket {cluster.snapshot_bucket}")
        return 0
    print(f"{'GEN':>4}  {'NAME':<40}  {'SIZE':>12}  {'SAVED (UTC)':<19}  {'NODE':<10}  POSITIONS")
    for s in snapshots:
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.created))
        print(f"{s.generation:>4}  {s.name:<40}  {s.size:>12}  {saved:<19}  {s.node:<10}  {_positions(s.positions)}")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from marmot_appliance.node.db_lock import DatabaseLock
    from marmot_appliance.snapshots import restore_snapshot

    cluster, node, connect = _resolve(args, needs_db=True)
    db = Path(node.db)
    if not db.parent.is_dir():
        raise MarmotError(f"directory {db.parent} does not exist")

    async def work(js):
        return await restore_snapshot(js, cluster, node, db, name=args.name, show_progress=None)

    # Refused while the node runs on this database (its consumers would keep applying into the
    # restored file from their old positions); a node starting meanwhile is refused in turn.
    with DatabaseLock(db, "snapshot restore"):
        info = asyncio.run(_with_jetstream(connect, work))
    print(f"restored {info.name} into {db}; the node replays from positions {_positions(info.positions)}")
    return 0


def _positions(positions: dict[str, int]) -> str:
    return ", ".join(f"{stream}={seq}" for stream, seq in sorted(positions.items())) or "none"


