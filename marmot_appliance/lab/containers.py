"""Per-host root filesystems (overlays of the cached image) and the systemd-nspawn processes.

Processes are tracked by PID plus their kernel start time, so teardown never signals a process
that merely reused a recorded PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from marmot_appliance.lab.image import VAGRANT_USER
from marmot_appliance.lab.shell import LabError, run
from marmot_appliance.lab.ssh import generate_host_key
from marmot_appliance.lab.topology import LabHost, LabTopology

STOP_TIMEOUT_S = 30.0


def host_dir(topology: LabTopology, host: LabHost) -> Path:
    return topology.state_dir / "hosts" / host.name


def is_mounted(path: Path) -> bool:
    target = str(path.resolve()) if path.exists() else str(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def mount_overlay(image_rootfs: Path, directory: Path) -> Path:
    """A writable overlay of the shared image for one host; returns the merged root."""
    upper, work, merged = directory / "upper", directory / "work", directory / "rootfs"
    for path in (upper, work, merged):
        path.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={image_rootfs},upperdir={upper},workdir={work}"
    run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)])
    return merged


def unmount(path: Path) -> None:
    if is_mounted(path):
        run(["umount", str(path)], timeout_s=60)


def personalize(rootfs: Path, host: LabHost, topology: LabTopology, client_public_key: str) -> str:
    """Hostname, /etc/hosts, the controller's key for root; returns the host's public ssh key."""
    (rootfs / "etc/hostname").write_text(f"{host.name}\n")
    hosts = ["127.0.0.1 localhost", f"127.0.1.1 {host.name}"]
    hosts += [f"{h.address} {h.name}" for h in topology.hosts if h.name != host.name]
    (rootfs / "etc/hosts").write_text("\n".join(hosts) + "\n")
    for home, owner in ((rootfs / "root", None), (rootfs / "home" / VAGRANT_USER, VAGRANT_USER)):
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        authorized.write_text(client_public_key + "\n")
        authorized.chmod(0o600)
        if owner:
            uid, gid = _owner_ids(rootfs, owner)
            for path in (ssh_dir, authorized):
                os.chown(path, uid, gid)
    return generate_host_key(rootfs / "etc/ssh", host.name)


def _owner_ids(rootfs: Path, user: str) -> tuple[int, int]:
    """uid/gid of a user of the host's image (its /etc/passwd, not this machine's)."""
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise LabError(f"user {user} missing from the lab image")


def process_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 22 (starttime) counted after the parenthesised command name, which may hold spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])


def start_container(topology: LabTopology, host: LabHost, rootfs: Path, log_path: Path) -> dict:
    """Boot the host's systemd inside its network namespace; returns {pid, start_time}."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        "systemd-nspawn",
        "--quiet",
        "--boot",
        f"--directory={rootfs}",
        f"--machine={host.machine}",
        f"--hostname={host.name}",
        "--register=no",
        "--keep-unit",  # no systemd on the machine: do not ask it (over D-Bus) for a scope
        f"--network-namespace-path=/run/netns/{host.namespace}",
        "--console=read-only",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    time.sleep(0.2)
    if process.poll() is not None:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise LabError(f"systemd-nspawn for {host.name} exited with {process.returncode}:\n{tail}")
    return {"pid": process.pid, "start_time": process_start_time(process.pid)}


def _wait_gone(pid: int, start_time: int | None, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap when it is our child (same process as `up`)
        except ChildProcessError:
            pass
        if process_start_time(pid) != start_time:
            return True
        time.sleep(0.1)
    return False


def stop_container(record: dict) -> None:
    """SIGTERM (nspawn then shuts the container down cleanly), SIGKILL if it hangs."""
    pid, start_time = record["pid"], record.get("start_time")
    if start_time is None or process_start_time(pid) != start_time:
        return  # already gone (or the PID now belongs to someone else: leave it alone)
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(pid, start_time, wait_s):
            return
    raise LabError(f"systemd-nspawn (pid {pid}) did not exit after SIGKILL")


def find_containers(machine: str) -> list[dict]:
    """{pid, start_time} of every systemd-nspawn booting `machine`, found by name in /proc:
    how `lab down` stops a lab whose state file is gone (or was written elsewhere)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode(errors="replace")).name == "systemd-nspawn" and (
            f"--machine={machine}".encode() in argv
        ):
            pid = int(entry.name)
            found.append({"pid": pid, "start_time": process_start_time(pid)})
    return found


def find_rootfs_mounts(lab: str, host_name: str) -> list[Path]:
    """Overlay roots of a lab host wherever a state directory put them (by path pattern)."""
    suffix = ("labs", lab, "hosts", host_name, "rootfs")
    with open("/proc/self/mounts") as mounts:
        targets = [Path(line.split()[1]) for line in mounts if line.split()[0] == "overlay"]
    return [target for target in targets if target.parts[-len(suffix):] == suffix]


def container_init_pid(record: dict) -> int:
    """PID (in this namespace) of the container's systemd: the nspawn process's child."""
    pid = record["pid"]
    if process_start_time(pid) != record.get("start_time"):
        raise LabError(f"systemd-nspawn (pid {pid}) is not running")
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        if children:
            return int(children[0])
    raise LabError(f"systemd-nspawn (pid {pid}) has no container process")


def console_command(topology: LabTopology, host_name: str, command: str) -> list[str]:
    """argv that runs a shell command inside a host without the network (a serial console).

    The way in while a host is cut off from the switch: nsenter into the container's
    namespaces, so the command sees the host's own file system, processes and network.
    """
    import json

    host = topology.host(host_name)
    state = json.loads((topology.state_dir / "state.json").read_text())
    init_pid = container_init_pid(state["containers"][host.name])
    return ["nsenter", f"--target={init_pid}", "--mount", "--uts", "--ipc", "--net", "--pid", "--",
            "/bin/sh", "-c", command]
