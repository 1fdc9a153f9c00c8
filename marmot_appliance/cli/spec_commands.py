"""`validate FILE...` and `config show FILE`: check a cluster spec, print it fully defaulted."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from marmot_appliance.errors import SpecError
from marmot_appliance.spec.loader import load_cluster
from marmot_appliance.spec.render import cluster_to_dict


def validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            cluster = load_cluster(path)
        except SpecError as exc:
            failed = True
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            continue
        if not args.quiet:
            nodes = len(cluster.nodes)
            print(f"{path}: valid (cluster {cluster.name!r}, {nodes} node{'s' if nodes != 1 else ''})")
    return 1 if failed else 0


def config_show(args: argparse.Namespace) -> int:
    document = cluster_to_dict(load_cluster(args.file))
    if args.format == "json":
        print(json.dumps(document, indent=2))
    else:
        print(f"# {args.file}, fully defaulted (marmot-appliance config show)")
        print(yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True), end="")
    return 0


def _usage_error(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def register(subparsers) -> None:
    validate_parser = subparsers.add_parser(
        "validate",
        help="check cluster specs against the schema and the semantic rules",
        description=(
            "Check cluster spec files: JSON Schema, duplicate keys, YAML 1.1 pitfalls, and semantic "
            "rules (unique names, ids and ports, replicas, paths), and the `schema:` SQL files (run through "
            "SQLite: CREATE TABLE/INDEX/VIEW/TRIGGER only). Every mistake is printed as "
            "file:line:col: $.json.path: message. Exit 0 when all files are valid, 1 otherwise."
        ),
    )
    validate_parser.add_argument("files", nargs="+", metavar="FILE", help="cluster spec (YAML)")
    validate_parser.add_argument("-q", "--quiet", action="store_true", help="print nothing for valid files")
    validate_parser.set_defaults(func=validate)

    config_parser = subparsers.add_parser(
        "config",
        help="inspect a cluster spec",
        description="Inspect a cluster spec.",
    )
    config_parser.set_defaults(func=lambda _args: _usage_error(config_parser))
    config_commands = config_parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show_parser = config_commands.add_parser(
        "show",
        help="print the spec with every default applied",
        description=(
            "Print the spec with every default applied, as YAML (or JSON). The output is itself a "
            "valid spec. Exit 1 when the spec is invalid."
        ),
    )
    show_parser.add_argument("file", metavar="FILE", help="cluster spec (YAML)")
    show_parser.add_argument("--format", choices=("yaml", "json"), default="yaml", help="output format (default: yaml)")
    show_parser.set_defaults(func=config_show)
