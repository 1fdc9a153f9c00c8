"""The `marmot-appliance` command: a thin layer over plain functions.

Each command group lives in its own module exposing `register(subparsers)`; every handler
returns an exit code. Typed errors (`MarmotError`) become one message on stderr and exit 1;
a traceback means a bug.
"""

from __future__ import annotations

import argparse
import os
import sys

from marmot_appliance import __version__
from marmot_appliance.errors import MarmotError, SpecError

from . import (
    appliance_commands,
    lab_commands,
    node_commands,
    schema_commands,
    snapshot_commands,
    spec_commands,
    verify_commands,
    watch_commands,
)

COMMAND_MODULES = (
    spec_commands,
    appliance_commands,
    schema_commands,
    node_commands,
    snapshot_commands,
    watch_commands,
    verify_commands,
    lab_commands,
)


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors; the house rule is 1 for any error."""

    def error(self, message: str):  # noqa: D401
        self.print_usage(sys.stderr)
        # A command whose exit codes carry a verdict (verify: 1 = diverged) sets its own.
        self.exit(getattr(self, "usage_exit_code", 1), f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="marmot-appliance",
        description="Leaderless SQLite replication over NATS JetStream, driven by one cluster spec.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "func", None)
    if handler is None:
        parser.print_help()
        return 1
    try:
        return int(handler(args) or 0)
    except SpecError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except MarmotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error. Silence the flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
