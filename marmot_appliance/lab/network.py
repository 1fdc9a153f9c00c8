"""Network namespaces, the switch bridge and the root-namespace blackhole route.

Safety (docs/deploy.md, "The lab"): the blackhole route for the lab subnet is added before any lab address exists
and removed last, so a mistaken request from the root namespace never leaves the machine.
"""

from __future__ import annotations

from pathlib import Path

from marmot_appliance.lab.shell import LabError, run
from marmot_appliance.lab.topology import BRIDGE, CONTROLLER_ADDRESS, HOST_INTERFACE, LAB_SUBNET, LabTopology

NETNS_DIR = Path("/run/netns")


def blackhole_present() -> bool:
    out = run(["ip", "route", "show", "type", "blackhole", str(LAB_SUBNET)], check=False).stdout
    return str(LAB_SUBNET) in out


def add_blackhole_route() -> bool:
    """Add the blackhole route; True when this call added it (so teardown removes it)."""
    if blackhole_present():
        return False
    run(["ip", "route", "add", "blackhole", str(LAB_SUBNET)])
    if not blackhole_present():
        raise LabError(f"blackhole route for {LAB_SUBNET} did not appear; refusing to continue")
    return True


def remove_blackhole_route() -> None:
    if blackhole_present():
        run(["ip", "route", "del", "blackhole", str(LAB_SUBNET)])


def namespace_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def namespace_pids(name: str) -> list[int]:
    if not namespace_exists(name):
        return []
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(pid) for pid in out.split() if pid.isdigit()]


def add_namespace(name: str) -> None:
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def delete_namespace(name: str) -> None:
    if namespace_exists(name):
        run(["ip", "netns", "delete", name])


def build_network(topology: LabTopology, record) -> None:
    """Namespaces, bridge and one veth per host; `record(name)` notes each namespace made."""
    switch = topology.switch_namespace
    add_namespace(switch)
    record(switch)
    run(["ip", "-n", switch, "link", "add", BRIDGE, "type", "bridge"])
    run(["ip", "-n", switch, "link", "set", BRIDGE, "up"])
    members = [(topology.controller_namespace, "vc0", CONTROLLER_ADDRESS)]
    members += [(h.namespace, h.switch_port, h.address) for h in topology.hosts]
    for namespace, port, address in members:
        add_namespace(namespace)
        record(namespace)
        run(["ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", HOST_INTERFACE, "netns", namespace])
        run(["ip", "-n", switch, "link", "set", port, "master", BRIDGE, "up"])
        run(["ip", "-n", namespace, "addr", "add", f"{address}/{LAB_SUBNET.prefixlen}", "dev", HOST_INTERFACE])
        run(["ip", "-n", namespace, "link", "set", HOST_INTERFACE, "up"])


def set_link(topology: LabTopology, host_name: str, up: bool) -> None:
    """Cut a host off the switch (down) or reconnect it (up)."""
    host = topology.host(host_name)
    run(["ip", "-n", topology.switch_namespace, "link", "set", host.switch_port, "up" if up else "down"])
