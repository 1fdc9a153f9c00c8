"""`lab up` and `lab down`: build every host of a spec, and remove every trace of it again.

Each step records what it created in `<state_dir>/state.json` before moving on, so a crash or
a failed `up` is always undone by `down` (which `up` itself calls when it fails). `down` is
safe to run any number of times, also without a state file: the containers are then found by
their machine name and the overlays by their mount path.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from marmot_appliance.lab import containers, network
from marmot_appliance.lab.image import ensure_image
from marmot_appliance.lab.shell import LabError, run
from marmot_appliance.lab.ssh import generate_client_key, ssh_command, stop_ssh_masters, write_client_files
from marmot_appliance.lab.topology import LabTopology

SSH_READY_TIMEOUT_S = 120.0


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, systemd-nspawn)")
    for tool in ("ip", "systemd-nspawn", "ssh", "ssh-keygen", "mount"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found; install: systemd-container openssh-client iproute2")


class LabState:
    """What the lab created, persisted after every change."""

    def __init__(self, topology: LabTopology):
        self.path = topology.state_dir / "state.json"
        self.data: dict = {"route_added": False, "namespaces": [], "mounts": [], "containers": {}}
        if self.path.is_file():
            self.data.update(json.loads(self.path.read_text()))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)

    def add(self, key: str, value) -> None:
        if value not in self.data[key]:
            self.data[key].append(value)
        self.save()


def is_up(topology: LabTopology) -> bool:
    return (topology.state_dir / "state.json").is_file() or any(
        network.namespace_exists(ns) for ns in topology.namespaces
    )


def lab_up(topology: LabTopology, progress=print) -> None:
    require_root()
    if is_up(topology):
        raise LabError(f"lab {topology.lab!r} is already up (or half built); run `lab down` first")
    image = ensure_image(topology.image_cache, progress=progress)
    state = LabState(topology)
    state.save()
    try:
        # Safety rule 1: the blackhole route exists before any lab address does.
        state.data["route_added"] = network.add_blackhole_route()
        state.save()
        network.build_network(topology, record=lambda ns: state.add("namespaces", ns))
        public_key = generate_client_key(topology)
        host_keys = {}
        for host in topology.hosts:
            directory = containers.host_dir(topology, host)
            rootfs = containers.mount_overlay(image, directory)
            state.add("mounts", str(rootfs))
            host_keys[host.name] = containers.personalize(rootfs, host, topology, public_key)
        write_client_files(topology, host_keys)
        for host in topology.hosts:
            rootfs = containers.host_dir(topology, host) / "rootfs"
            log = topology.state_dir / "logs" / f"{host.name}.log"
            state.data["containers"][host.name] = containers.start_container(topology, host, rootfs, log)
            state.save()
        progress(f"booting {len(topology.hosts)} hosts; waiting for sshd")
        for host in topology.hosts:
            wait_for_ssh(topology, host.name)
    except BaseException:
        lab_down(topology, progress=lambda _msg: None)
        raise
    progress(f"lab {topology.lab} is up: " + ", ".join(f"{h.name}={h.address}" for h in topology.hosts))


def wait_for_ssh(topology: LabTopology, host_name: str, timeout_s: float = SSH_READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        result = run(ssh_command(topology, host_name, "true"), check=False, timeout_s=30)
        if result.returncode == 0:
            return
        last = (result.stderr or result.stdout).strip()
        time.sleep(0.5)
    raise LabError(f"lab host {host_name} not reachable over ssh within {timeout_s:.0f}s: {last}")


def lab_down(topology: LabTopology, progress=print) -> None:
    """Stop the containers (by PID), unmount, delete namespaces and the route. Idempotent."""
    require_root()
    state = LabState(topology)
    problems = []
    if network.namespace_exists(topology.controller_namespace):
        stop_ssh_masters(topology)  # multiplexed connections live in the controller namespace
    for host in topology.hosts:
        # State lost or kept elsewhere: the hosts are still found by their machine name.
        for index, record in enumerate(containers.find_containers(host.machine)):
            if record not in state.data["containers"].values():
                state.data["containers"][f"{host.name}#found{index}"] = record
    for name, record in list(state.data["containers"].items()):
        try:
            containers.stop_container(record)
            del state.data["containers"][name]
            state.save()
        except LabError as exc:
            problems.append(str(exc))
    mounts = set(state.data["mounts"]) | {
        str(containers.host_dir(topology, h) / "rootfs") for h in topology.hosts
    } | {str(path) for h in topology.hosts for path in containers.find_rootfs_mounts(topology.lab, h.name)}
    for mount in sorted(mounts):
        try:
            containers.unmount(Path(mount))
        except LabError as exc:
            problems.append(str(exc))
    for namespace in dict.fromkeys(state.data["namespaces"] + topology.namespaces):
        leftovers = _wait_namespace_empty(namespace)
        if leftovers:
            # Not ours to kill: report them, the namespace stays until they exit.
            problems.append(f"namespace {namespace} still has processes {leftovers}; stop them and rerun")
            continue
        network.delete_namespace(namespace)
    if problems:
        raise LabError("lab down incomplete:\n  " + "\n  ".join(problems))
    if not _other_labs_present():
        # The route is shared by every lab on this machine: the last one down removes it.
        network.remove_blackhole_route()
    shutil.rmtree(topology.state_dir, ignore_errors=True)
    progress(f"lab {topology.lab} is down")


def _wait_namespace_empty(namespace: str, timeout_s: float = 20.0) -> list[int]:
    """PIDs still in the namespace after a bounded wait: a stopped container's processes
    are reaped by the kernel shortly after systemd-nspawn itself exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = network.namespace_pids(namespace)
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


def _other_labs_present() -> bool:
    return network.NETNS_DIR.is_dir() and any(p.name.startswith("mlab-") for p in network.NETNS_DIR.iterdir())
