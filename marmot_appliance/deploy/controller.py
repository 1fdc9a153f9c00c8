"""Controller-side steps the Ansible roles call (`python -m marmot_appliance.deploy.controller`).

Each prints one JSON object, `{"changed": bool, ...}`, so a task reports `changed` honestly:

    wheelhouse DIR                build / refresh the offline wheelhouse
    credentials SPEC STATE_DIR    create the cluster's generated NATS secrets once (0600)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from marmot_appliance.errors import MarmotError


def ensure_controller_credentials(spec_path: str, state_dir: str) -> bool:
    """Generate the route secret (every auth mode) and, for a `generated` spec, the client
    credentials; True when anything was created now."""
    from marmot_appliance.appliance.credentials import (
        credentials_path,
        ensure_generated_credentials,
        ensure_route_credentials,
        route_credentials_path,
    )
    from marmot_appliance.appliance.state import StateDir
    from marmot_appliance.spec.loader import load_cluster

    cluster = load_cluster(spec_path)
    state = StateDir(Path(state_dir))
    route_existed = route_credentials_path(state).is_file()
    ensure_route_credentials(state)
    if cluster.nats.auth.mode != "generated":
        return not route_existed
    existed = credentials_path(state).is_file()
    ensure_generated_credentials(state, cluster)
    return not (existed and route_existed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marmot_appliance.deploy.controller")
    commands = parser.add_subparsers(dest="command", required=True)
    wheels = commands.add_parser("wheelhouse")
    wheels.add_argument("directory")
    wheels.add_argument("--target-arg", action="append", default=[], help="extra pip target option")
    wheels.add_argument("--extra", action="append", default=[], help="additional requirement")
    wheels.add_argument("--pack-only", action="store_true", help="use the wheels as they are (no build)")
    wheels.add_argument("--checkout", help="source tree the playbook lives in (built from when possible)")
    creds = commands.add_parser("credentials")
    creds.add_argument("spec")
    creds.add_argument("state_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "wheelhouse":
            from marmot_appliance.deploy.wheelhouse import build_wheelhouse, pack_wheelhouse

            if args.pack_only:
                print(json.dumps({"changed": pack_wheelhouse(Path(args.directory))}))
                return 0
            result = build_wheelhouse(Path(args.directory), target_args=args.target_arg, extra_requirements=args.extra,
                                      checkout=Path(args.checkout) if args.checkout else None)
            print(json.dumps({"changed": result.changed, "project_wheel": result.project_wheel,
                              "origin": result.origin, "downloaded": result.downloaded}))
        else:
            print(json.dumps({"changed": ensure_controller_credentials(args.spec, args.state_dir)}))
    except MarmotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
