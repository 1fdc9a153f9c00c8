"""The lab's ssh identity: one client key, one host key per host, a pinned known_hosts file.

Ansible and `lab exec` reach the hosts exactly as they would reach VMs: over ssh, from the
controller namespace, with strict host key checking against keys the lab generated.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from marmot_appliance.lab.shell import run
from marmot_appliance.lab.topology import LabTopology

CONTROL_PERSIST_S = 15  # below lab down's 20 s wait for an empty namespace


def ssh_dir(topology: LabTopology) -> Path:
    return topology.state_dir / "ssh"


def client_key(topology: LabTopology) -> Path:
    return ssh_dir(topology) / "id_ed25519"


def ssh_config_path(topology: LabTopology) -> Path:
    return ssh_dir(topology) / "ssh_config"


def generate_client_key(topology: LabTopology) -> str:
    """Create the controller's key pair (once per lab); returns the public key line."""
    directory = ssh_dir(topology)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    key = client_key(topology)
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"marmot-lab-{topology.lab}", "-f", str(key)])
    return key.with_suffix(".pub").read_text().strip()


def generate_host_key(etc_ssh: Path, host_name: str) -> str:
    """Write the host's ed25519 key into its root filesystem; returns the public key."""
    key = etc_ssh / "ssh_host_ed25519_key"
    for old in etc_ssh.glob("ssh_host_ed25519_key*"):
        old.unlink()
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host_name}", "-f", str(key)])
    public = key.with_suffix(".pub").read_text().split()
    return f"{public[0]} {public[1]}"


def write_client_files(topology: LabTopology, host_keys: dict[str, str]) -> None:
    """known_hosts pinned to the generated host keys, and an ssh_config for every host."""
    directory = ssh_dir(topology)
    known = [f"{h.address},{h.name} {host_keys[h.name]}" for h in topology.hosts if h.name in host_keys]
    (directory / "known_hosts").write_text("\n".join(known) + "\n")
    lines = []
    for host in topology.hosts:
        lines += [f"Host {host.name}", f"  HostName {host.address}", ""]
    patterns = " ".join([h.name for h in topology.hosts] + [h.address for h in topology.hosts])
    lines += [
        f"Host {patterns}",
        "  User root",
        f"  IdentityFile {client_key(topology)}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {directory / 'known_hosts'}",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "  ConnectTimeout 5",
        # No multiplexing for `lab exec` and one-off ssh: a master would outlive the command
        # and pin the namespace. Ansible turns it on for its runs (ansible_environment).
        "  ControlMaster no",
        "  ControlPath none",
        "",
    ]
    ssh_config_path(topology).write_text("\n".join(lines))


CONTROL_DIR = Path("/tmp/marmot-lab-ssh")
# sun_path holds 107 characters; ssh adds "." + 16 random characters to %C (40) while binding.
MAX_SOCKET_PATH = 107


def control_path(topology: LabTopology) -> str:
    """The multiplexing socket per lab and host connection. Named after the lab (%C, a hash of
    the connection, is the same for two labs using the same addresses) and kept short: a unix
    socket path, with what ssh appends, must fit in 107 characters whatever the lab is called."""
    CONTROL_DIR.mkdir(mode=0o700, exist_ok=True)
    prefix = f"{CONTROL_DIR}/{topology.lab}-"
    room = MAX_SOCKET_PATH - len(f"{CONTROL_DIR}/-") - 40 - 17  # what is left for the lab's name
    if len(topology.lab) > room:
        prefix = f"{CONTROL_DIR}/{topology.lab[:room]}-"
    return prefix + "%C"


def stop_ssh_masters(topology: LabTopology) -> None:
    """Ask every host's ssh master (if any) to exit, from the controller namespace."""
    config = ssh_config_path(topology)
    if not config.is_file():
        return
    for host in topology.hosts:
        run(["ip", "netns", "exec", topology.controller_namespace, "ssh", "-F", str(config),
             "-o", f"ControlPath={control_path(topology)}", "-O", "exit", host.name], check=False, timeout_s=15)


def ssh_command(topology: LabTopology, host_name: str, command: list[str] | str) -> list[str]:
    """argv that runs `command` on a lab host over ssh, from inside the controller namespace."""
    host = topology.host(host_name)
    remote = command if isinstance(command, str) else " ".join(shlex.quote(part) for part in command)
    return [
        "ip", "netns", "exec", topology.controller_namespace,
        "ssh", "-F", str(ssh_config_path(topology)), host.name, remote,
    ]


def ansible_environment(topology: LabTopology) -> dict[str, str]:
    """Environment for ansible-playbook run in the controller namespace against the lab.

    One ssh connection per host, reused by every task of the run (a new connection per task
    dominated a no-op run, docs/performance.md). The master exits CONTROL_PERSIST_S after its
    last use — within `lab down`'s wait for an empty namespace — and `lab down` asks it to exit
    at once (`stop_ssh_masters`), so none outlives the lab or pins a namespace."""
    return {
        "ANSIBLE_SSH_ARGS": (f"-F {ssh_config_path(topology)} -o ControlMaster=auto "
                             f"-o ControlPersist={CONTROL_PERSIST_S}s -o ControlPath={control_path(topology)}"),
        "ANSIBLE_PRIVATE_KEY_FILE": str(client_key(topology)),
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_REMOTE_USER": "root",
    }
