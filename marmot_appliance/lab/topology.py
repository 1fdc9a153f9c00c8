"""Names and addresses of a lab, derived from a cluster spec (pure: no side effects)."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from marmot_appliance.errors import MarmotError
from marmot_appliance.spec.model import Cluster

LAB_SUBNET = ipaddress.ip_network("10.77.0.0/24")
CONTROLLER_ADDRESS = "10.77.0.10"
BRIDGE = "br0"
HOST_INTERFACE = "eth0"  # inside each host's namespace


DEFAULT_CACHE_DIR = Path("/var/lib/marmot-appliance-lab")


def default_cache_dir() -> Path:
    """Where every lab keeps its image, state and ssh keys: MARMOT_LAB_CACHE, else one fixed
    place for the machine. Never derived from the install (editable or not) nor from the
    user's home, so `lab down` from any install finds what `lab up` from another one built."""
    override = os.environ.get("MARMOT_LAB_CACHE")
    return Path(override) if override else DEFAULT_CACHE_DIR


@dataclass(frozen=True)
class LabHost:
    name: str  # the spec node name, also the container's hostname
    address: str
    namespace: str
    switch_port: str  # veth end in the switch namespace (the link to cut for a partition)
    machine: str  # systemd-nspawn machine name


@dataclass(frozen=True)
class LabTopology:
    lab: str
    hosts: tuple[LabHost, ...]
    controller_namespace: str
    switch_namespace: str
    state_dir: Path
    image_cache: Path

    def host(self, name: str) -> LabHost:
        for host in self.hosts:
            if host.name == name or host.address == name:
                return host
        known = ", ".join(h.name for h in self.hosts)
        raise MarmotError(f"no lab host {name!r}; the lab has: {known}")

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_namespace, self.controller_namespace] + [h.namespace for h in self.hosts]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-") or "lab"


def topology_for(cluster: Cluster, cache_dir: Path | None = None) -> LabTopology:
    """Lab layout for every distinct host of the spec; refuses addresses outside the lab subnet."""
    cache = cache_dir or default_cache_dir()
    lab = _slug(cluster.name)
    seen: dict[str, str] = {}
    hosts: list[LabHost] = []
    problems: list[str] = []
    for node in cluster.nodes:
        try:
            address = ipaddress.ip_address(node.host)
        except ValueError:
            problems.append(f"node {node.name}: host {node.host!r} is not an IP address")
            continue
        if address not in LAB_SUBNET or str(address) in (CONTROLLER_ADDRESS, str(LAB_SUBNET[0]), str(LAB_SUBNET[-1])):
            problems.append(
                f"node {node.name}: host {node.host} is outside the lab subnet {LAB_SUBNET} "
                f"(or reserved: {CONTROLLER_ADDRESS} is the controller)"
            )
            continue
        if node.host in seen:
            continue  # several nodes may share a host; the lab builds each host once
        seen[node.host] = node.name
        index = len(hosts) + 1
        hosts.append(
            LabHost(
                name=node.name,
                address=node.host,
                namespace=f"mlab-{lab}-{_slug(node.name)}",
                switch_port=f"vh{index}",
                machine=f"mlab-{lab}-{_slug(node.name)}",
            )
        )
    if problems:
        raise MarmotError("cannot build a lab for this spec:\n  " + "\n  ".join(problems))
    return LabTopology(
        lab=lab,
        hosts=tuple(hosts),
        controller_namespace=f"mlab-{lab}-ctl",
        switch_namespace=f"mlab-{lab}-sw",
        state_dir=cache / "labs" / lab,
        image_cache=cache / "images",
    )
