"""`marmot-appliance lab ...`: the multi-host lab of systemd containers (needs root).

    lab up SPEC                  build and boot every host the spec names
    lab down SPEC                remove every namespace, mount, route and process of the lab
    lab exec SPEC HOST -- CMD    run CMD on a lab host over ssh from the controller namespace
    lab link SPEC HOST up|down   reconnect / cut a host off the lab switch
    lab env SPEC                 everything a hand-run ansible-playbook against the lab needs
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from marmot_appliance.errors import MarmotError


def _topology(spec_path: str):
    from marmot_appliance.lab.topology import topology_for
    from marmot_appliance.spec.loader import load_cluster

    return topology_for(load_cluster(spec_path))


def _progress(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_up(args) -> int:
    from marmot_appliance.lab.lifecycle import lab_up

    lab_up(_topology(args.spec), progress=_progress)
    _progress(f"next, as root: marmot-appliance apply {args.spec} "
              f"(or `marmot-appliance lab env {args.spec}` for a hand-run ansible-playbook)")
    return 0


def cmd_down(args) -> int:
    from marmot_appliance.lab.lifecycle import lab_down

    lab_down(_topology(args.spec), progress=_progress)
    return 0


def cmd_exec(args) -> int:
    from marmot_appliance.lab.ssh import ssh_command

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise MarmotError("lab exec: give a command after HOST, e.g. `lab exec SPEC n1 -- uptime`")
    topology = _topology(args.spec)
    if not (topology.state_dir / "state.json").is_file():
        raise MarmotError(f"lab {topology.lab!r} is not up; run `marmot-appliance lab up {args.spec}`")
    # One argument is a shell command line (like ssh); several are quoted word by word.
    remote = command[0] if len(command) == 1 else " ".join(shlex.quote(part) for part in command)
    argv = ssh_command(topology, args.host, remote)
    return subprocess.run(argv, check=False).returncode


def cmd_link(args) -> int:
    from marmot_appliance.lab.network import set_link

    set_link(_topology(args.spec), args.host, up=args.state == "up")
    return 0


def cmd_env(args) -> int:
    """Everything a hand-run ansible-playbook against the lab needs, as shell lines."""
    from pathlib import Path

    from marmot_appliance.deploy.inventory import wheelhouse_dir
    from marmot_appliance.deploy.remote import ansible_dir
    from marmot_appliance.lab.ssh import ansible_environment
    from marmot_appliance.lab.topology import topology_for
    from marmot_appliance.spec.loader import load_cluster

    cluster = load_cluster(args.spec)
    topology = topology_for(cluster)
    playbooks = ansible_dir()
    spec = Path(args.spec).resolve()
    bin_dir = Path(sys.executable).parent
    environment = {"ANSIBLE_CONFIG": str(playbooks / "ansible.cfg"), **ansible_environment(topology)}
    print(f"# lab {topology.lab}: hosts reachable only from the namespace {topology.controller_namespace}; as root:")
    for key, value in environment.items():
        print(f"export {key}={shlex.quote(value)}")
    wheels, build = wheelhouse_dir(cluster)
    extra = ""
    if build:
        print("# 1. the wheelhouse, here (the package index is reachable only outside the lab):")
        print(f"{shlex.quote(sys.executable)} -m marmot_appliance.deploy.controller wheelhouse "
              f"{shlex.quote(str(wheels))} --checkout {shlex.quote(str(playbooks.parent))}"
              + (" --extra supervisor" if cluster.deploy.service_manager == "supervisor" else ""))
        extra = " -e marmot_packages_build_wheelhouse=false"
    print("# 2. the playbook, from the lab's controller namespace:")
    print(f"ip netns exec {topology.controller_namespace} {shlex.quote(str(bin_dir / 'ansible-playbook'))} "
          f"-i {shlex.quote(str(spec))} {shlex.quote(str(playbooks / 'site.yml'))}{extra}")
    print(f"# (marmot-appliance plan|apply|status|destroy {args.spec} do all of this by themselves, as root)")
    return 0


def register(subparsers) -> None:
    lab = subparsers.add_parser("lab", help="multi-host lab of systemd containers in network namespaces (root)")
    commands = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", parser_class=type(lab))
    lab.set_defaults(func=lambda _args: (lab.print_help(), 1)[1])

    up = commands.add_parser("up", help="build and boot every host the spec names")
    up.add_argument("spec", metavar="SPEC")
    up.set_defaults(func=cmd_up)

    down = commands.add_parser("down", help="tear the lab down (idempotent)")
    down.add_argument("spec", metavar="SPEC")
    down.set_defaults(func=cmd_down)

    exec_ = commands.add_parser("exec", help="run a command on a lab host over ssh")
    exec_.add_argument("spec", metavar="SPEC")
    exec_.add_argument("host", metavar="HOST", help="node name or address")
    exec_.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    exec_.set_defaults(func=cmd_exec)

    link = commands.add_parser("link", help="cut a host off the lab switch or reconnect it")
    link.add_argument("spec", metavar="SPEC")
    link.add_argument("host", metavar="HOST")
    link.add_argument("state", choices=("up", "down"))
    link.set_defaults(func=cmd_link)

    env = commands.add_parser("env", help="print exports for ansible-playbook against the lab")
    env.add_argument("spec", metavar="SPEC")
    env.set_defaults(func=cmd_env)
