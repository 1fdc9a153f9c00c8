"""Lab pieces that need no root: mirror discovery, topology rules, CLI error handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from marmot_appliance.errors import MarmotError
from marmot_appliance.lab.mirror import debian_mirror
from marmot_appliance.lab.topology import topology_for
from marmot_appliance.spec.model import Cluster, Node

REPO = Path(__file__).resolve().parents[1]


def _cluster(*hosts: str, name: str = "shop") -> Cluster:
    return Cluster(
        name=name,
        nodes=tuple(Node(name=f"n{i}", id=i, host=h, advertise=h, db="/var/lib/x/app.db") for i, h in enumerate(hosts, 1)),
    )


def test_mirror_from_deb822_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("MARMOT_LAB_MIRROR", raising=False)
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert debian_mirror(sources, tmp_path / "missing.list") == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_list(tmp_path, monkeypatch):
    monkeypatch.delenv("MARMOT_LAB_MIRROR", raising=False)
    listing = tmp_path / "sources.list"
    listing.write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n"
    )
    assert debian_mirror(tmp_path / "none.d", listing) == "http://mirror.example/debian"


def test_no_mirror_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MARMOT_LAB_MIRROR", raising=False)
    with pytest.raises(MarmotError, match="no Debian mirror"):
        debian_mirror(tmp_path / "none.d", tmp_path / "none.list")


def test_topology_names_and_ports(tmp_path):
    topology = topology_for(_cluster("10.77.0.11", "10.77.0.12", "10.77.0.12"), cache_dir=tmp_path)
    assert [h.name for h in topology.hosts] == ["n1", "n2"]  # a shared host is built once
    assert [h.switch_port for h in topology.hosts] == ["vh1", "vh2"]
    assert topology.controller_namespace == "mlab-shop-ctl"
    assert topology.host("10.77.0.12").name == "n2"
    assert all(len(h.switch_port) <= 15 for h in topology.hosts)


@pytest.mark.parametrize("host", ["192.168.1.5", "10.77.0.10", "127.0.0.1", "example.org", "10.77.0.255"])
def test_topology_refuses_hosts_outside_the_lab(tmp_path, host):
    with pytest.raises(MarmotError, match="lab"):
        topology_for(_cluster("10.77.0.11", host), cache_dir=tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marmot_appliance", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_lab_cli_rejects_a_spec_with_non_lab_hosts():
    result = _cli("lab", "up", "examples/local-3-node.yaml")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "outside the lab subnet" in result.stderr


def test_lab_cli_reports_missing_spec_and_lab_not_up(tmp_path):
    missing = _cli("lab", "down", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and missing.stderr.strip()
    spec = tmp_path / "cluster.yaml"
    spec.write_text((REPO / "vagrant" / "cluster.yaml").read_text().replace("name: vagrant", "name: never-up"))
    not_up = _cli("lab", "exec", str(spec), "node1", "--", "true")
    assert not_up.returncode == 1 and "not up" in not_up.stderr
    no_command = _cli("lab", "exec", str(spec), "node1")
    assert no_command.returncode == 1 and "give a command" in no_command.stderr


@pytest.mark.parametrize("name", ["vagrant", "mhdeploy", "schemalab", "x" * 63])
def test_ssh_control_socket_fits_a_unix_socket_path_for_any_lab_name(name):
    """ssh binds `<ControlPath with %C expanded>.<16 random characters>`; a path over 107
    characters made every host unreachable for labs with longer names."""
    from marmot_appliance.lab.ssh import MAX_SOCKET_PATH, control_path

    path = control_path(topology_for(_cluster("10.77.0.11", "10.77.0.12", name=name)))
    assert len(path.replace("%C", "c" * 40) + "." + "r" * 16) <= MAX_SOCKET_PATH
    assert path.endswith("%C") and name[:20] in path  # one socket per lab: the same %C in two labs differs here


def test_two_labs_on_the_same_addresses_never_share_a_control_socket():
    from marmot_appliance.lab.ssh import control_path

    first = control_path(topology_for(_cluster("10.77.0.11", name="vagrant")))
    second = control_path(topology_for(_cluster("10.77.0.11", name="newuser")))
    assert first != second
