"""`marmot-appliance watch`: print every row change on the shard streams as JSON lines.

A thin layer over `marmot_appliance.feed.changes`: argument checks, the connection settings
(from the cluster spec or from flags), one JSON object per line, and clean exits on Ctrl-C,
SIGTERM and a closed pipe (`watch ... | head -n 5`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from marmot_appliance.cli.options import positive_int
from marmot_appliance.errors import MarmotError
from marmot_appliance.feed import OPERATIONS, changes, parse_start
from marmot_appliance.spec.model import ReplicationSettings

EPILOG = """\
output: one JSON object per row change, e.g.
  {"table": "t", "op": "upsert", "pk": [1], "values": {"id": 1, "b": {"$base64": "AAE="}},
   "version": 111..., "origin": 1, "stream": "marmot-changes-1", "seq": 7, "time": "...Z"}
BLOBs are {"$base64": ...}; NaN and infinities are {"$float": "nan"|"inf"|"-inf"}.
See docs/wire-format.md.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="print the cluster's row changes as JSON lines",
        description="Follow every shard stream with an ordered consumer and print one JSON line "
        "per row change (table, op, pk, values, version, origin, stream, seq, time).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("where to read (one of --spec or --nats-url)")
    source.add_argument("--spec", metavar="FILE", help="cluster spec: servers, credentials, prefixes, shards")
    source.add_argument("--node", metavar="NAME", help="with --spec: connect through this node's server first")
    source.add_argument("--state-dir", metavar="DIR", help="with --spec: where generated credentials live")
    source.add_argument("--nats-url", metavar="URLS", help="comma-separated NATS server URLs")
    source.add_argument("--stream-prefix", metavar="P", help="stream name prefix (default: marmot-changes)")
    source.add_argument("--subject-prefix", metavar="P", help="check streams capture <P>-<n>")
    source.add_argument(
        "--shards", metavar="N", type=positive_int, help="number of shard streams (default: discover)"
    )
    parser.add_argument(
        "--from",
        dest="from_",
        metavar="WHERE",
        default="now",
        help="now (default), start, a stream sequence, or an ISO 8601 time",
    )
    parser.add_argument("--table", action="append", metavar="NAME", help="only this table (repeatable)")
    parser.add_argument("--op", action="append", choices=OPERATIONS, help="only this operation (repeatable)")
    parser.set_defaults(func=run_watch)



@dataclass
class WatchTarget:
    """Everything `changes()` needs to know about where the streams are."""

    nats_url: str
    stream_prefix: str
    shards: int | None
    subject_prefix: str | None
    connect_options: dict = field(default_factory=dict)


def resolve_target(args: argparse.Namespace) -> WatchTarget:
    if bool(args.spec) == bool(args.nats_url):
        raise MarmotError("watch needs exactly one of --spec FILE or --nats-url URLS")
    if args.spec:
        return _target_from_spec(args)
    if args.node or args.state_dir:
        raise MarmotError("--node and --state-dir only apply with --spec")
    return WatchTarget(
        nats_url=args.nats_url,
        stream_prefix=args.stream_prefix or ReplicationSettings.stream_prefix,
        shards=args.shards,
        subject_prefix=args.subject_prefix,
    )


def _target_from_spec(args: argparse.Namespace) -> WatchTarget:
    from marmot_appliance.nats_client import connect_kwargs
    from marmot_appliance.spec.loader import load_cluster

    cluster = load_cluster(Path(args.spec))
    node = None
    if args.node:
        try:
            node = cluster.node(args.node)
        except KeyError:
            names = ", ".join(n.name for n in cluster.nodes)
            raise MarmotError(f"no node named {args.node!r} in {args.spec} (nodes: {names})") from None
    # watch only reads: it connects as the read-only reader identity, never as a node.
    options = connect_kwargs(cluster, node, Path(args.state_dir) if args.state_dir else None, as_reader=True)
    servers = options.pop("servers")
    replication = cluster.replication
    return WatchTarget(
        nats_url=",".join(servers),
        stream_prefix=args.stream_prefix or replication.stream_prefix,
        shards=args.shards or replication.shards,
        subject_prefix=args.subject_prefix or replication.subject_prefix,
        connect_options=options,
    )


def run_watch(args: argparse.Namespace) -> int:
    parse_start(args.from_)  # bad --from: a clear message before any connection
    target = resolve_target(args)
    logging.basicConfig(level=logging.WARNING, format="watch: %(message)s", stream=sys.stderr)
    try:
        return asyncio.run(_watch(args, target))
    except BrokenPipeError:
        return _reader_went_away()


async def _watch(args: argparse.Namespace, target: WatchTarget) -> int:
    """Print until interrupted. Ctrl-C / SIGTERM cancel this task; both are a normal end."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None  # a coroutine that asyncio.run runs is always inside a task
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    watching_pipe = _cancel_when_pipe_closes(loop, task)
    out = sys.stdout
    feed = changes(
        target.nats_url,
        target.stream_prefix,
        target.shards,
        from_=args.from_,
        tables=args.table,
        ops=args.op,
        subject_prefix=target.subject_prefix,
        connect_options=target.connect_options,
        on_undecodable=_report_undecodable,
    )
    try:
        async with contextlib.aclosing(feed):
            async for record in feed:
                out.write(json.dumps(record.to_json_dict(), ensure_ascii=False, allow_nan=False))
                out.write("\n")
                out.flush()
    except asyncio.CancelledError:
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if watching_pipe:
            loop.remove_reader(sys.stdout.fileno())
    if stdout_reader_closed():
        return _reader_went_away()
    return 0


def stdout_reader_closed() -> bool:
    """True when stdout is a pipe whose reading end is gone (writing would raise EPIPE)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(revents & select.POLLERR for _, revents in poller.poll(0))
    except (OSError, ValueError):
        return False


def _cancel_when_pipe_closes(loop: asyncio.AbstractEventLoop, task: asyncio.Task) -> bool:
    """Stop as soon as a reader such as `head` closes the pipe, not at the next change.

    Without this, `watch | head -n 5` would sit idle until one more change arrived, since only a
    write notices a closed pipe. The kernel flags the pipe's write end with an error once its
    reader is gone; epoll reports that error for any registration, so a reader callback on
    stdout fires then. Only for pipes: on a terminal, input would wake the callback.
    """
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False

        def check() -> None:
            if stdout_reader_closed():
                loop.remove_reader(fd)
                task.cancel()

        loop.add_reader(fd, check)
        return True
    except (OSError, ValueError, NotImplementedError):
        return False


def _report_undecodable(stream: str, seq: int, error: MarmotError) -> None:
    print(f"watch: skipping undecodable message {stream} seq {seq}: {error}", file=sys.stderr)


def _reader_went_away() -> int:
    """stdout's reader closed (e.g. `head`): a normal end. Keep the exit-time flush quiet."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0
