"""Where ansible-playbook runs: directly, or inside a running lab's controller namespace.

Lab hosts are reachable only from the lab's controller namespace (the root namespace holds a
blackhole route for the lab subnet, docs/deploy.md), and the package index only from the root
namespace. So for a spec whose hosts belong to a running lab, `plan`/`apply`/`status`/`destroy`
prepare the wheelhouse here first, then start ansible-playbook with `ip netns exec <controller>`
and the lab's ssh settings, telling the role to use the wheelhouse as it is.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from marmot_appliance.deploy.errors import DeployError
from marmot_appliance.errors import MarmotError
from marmot_appliance.spec.model import Cluster


@dataclass(frozen=True)
class Launch:
    """How to start ansible-playbook: a command prefix, extra environment and extra arguments."""

    prefix: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()
    lab: str | None = None


def _same_namespace(netns_path: Path) -> bool:
    """Is this process already inside the named network namespace?"""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat(netns_path).st_ino
    except OSError:
        return False


def lab_topology_of(cluster: Cluster):
    """The lab layout when every host of the spec is a lab address, else None."""
    from marmot_appliance.lab.topology import topology_for

    try:
        return topology_for(cluster)
    except MarmotError:
        return None


def lab_is_running(topology) -> bool:
    from marmot_appliance.lab.network import namespace_exists

    return namespace_exists(topology.controller_namespace) and (topology.state_dir / "state.json").is_file()


def prepare_wheelhouse(cluster: Cluster, progress=lambda message: print(message, file=sys.stderr)) -> bool:
    """Build the wheelhouse where the package index is reachable; True when one was built
    (the playbook then packs it as it is), False for deploy.package_source directories."""
    from marmot_appliance.deploy.inventory import wheelhouse_dir
    from marmot_appliance.deploy.remote import ansible_dir
    from marmot_appliance.deploy.wheelhouse import build_wheelhouse

    directory, build = wheelhouse_dir(cluster)
    if not build:
        return False
    extra = ["supervisor"] if cluster.deploy.service_manager == "supervisor" else []
    result = build_wheelhouse(directory, extra_requirements=extra, checkout=ansible_dir().parent)
    progress(f"wheelhouse {directory}: marmot-appliance from {result.origin}"
             + (", dependencies downloaded" if result.downloaded else ""))
    return True


def launch_for(cluster: Cluster, spec_path: Path, prepare: bool = True) -> Launch:
    """Plain `ansible-playbook`, unless the spec's hosts belong to a lab on this machine."""
    from marmot_appliance.lab.network import NETNS_DIR, blackhole_present
    from marmot_appliance.lab.ssh import ansible_environment
    from marmot_appliance.lab.topology import LAB_SUBNET

    topology = lab_topology_of(cluster)
    if topology is None:
        return Launch()
    if not lab_is_running(topology):
        if blackhole_present():
            # The lab's safety route: from here, requests to these addresses go nowhere.
            raise DeployError(
                f"the hosts of {spec_path} are lab addresses ({LAB_SUBNET}) and lab {topology.lab!r} "
                f"is not up: run `sudo marmot-appliance lab up {spec_path}` first"
            )
        return Launch()  # e.g. Vagrant VMs at the same addresses
    environment = ansible_environment(topology)
    if _same_namespace(NETNS_DIR / topology.controller_namespace):
        return Launch(env=environment, lab=topology.lab)  # run by hand inside the namespace
    if os.geteuid() != 0:
        raise DeployError(
            f"the hosts of {spec_path} belong to the running lab {topology.lab!r}, reachable only from its "
            f"controller namespace {topology.controller_namespace}: run this command as root "
            f"(sudo), or see `marmot-appliance lab env {spec_path}`"
        )
    extra: tuple[str, ...] = ()
    if prepare and prepare_wheelhouse(cluster):
        extra = ("-e", "marmot_packages_build_wheelhouse=false")
    return Launch(prefix=("ip", "netns", "exec", topology.controller_namespace), env=environment,
                  extra_args=extra, lab=topology.lab)


def unreachable_hint(cluster: Cluster, spec_path: Path, hosts: list[str]) -> str:
    """What to do about hosts Ansible could not reach, when they are lab hosts."""
    topology = lab_topology_of(cluster)
    if topology is None or not hosts:
        return ""
    if not lab_is_running(topology):
        return f"\nthese are lab hosts and lab {topology.lab!r} is not up: run `sudo marmot-appliance lab up {spec_path}`"
    names = " ".join(sorted(hosts))
    return (
        f"\nlab host(s) {names} did not answer over ssh from the controller namespace: a host cut off with "
        f"`lab link {spec_path} HOST down` comes back with `lab link {spec_path} HOST up`; a host that stopped "
        f"needs `sudo marmot-appliance lab down {spec_path}` and `lab up` again"
    )
