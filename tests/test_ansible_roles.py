"""The Ansible side, without hosts: lint, role contracts, the spec inventory and the filters."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from marmot_appliance.natsd.config import check_config_file

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "ansible"
BIN = REPO / ".venv" / "bin"
ROLES = ("marmot_packages", "nats_server", "marmot_node")


def _env(**extra: str) -> dict:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env.update(extra)
    return env


def _run(command: list[str], timeout_s: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=_env(**env), cwd=REPO, timeout=timeout_s)


@pytest.mark.slow
def test_ansible_lint_production_profile_passes():
    result = subprocess.run(
        [str(BIN / "ansible-lint"), "--offline", "--nocolor", "--profile", "production"],
        capture_output=True, text=True, cwd=ANSIBLE, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_match_defaults(role):
    """Every default is declared with the same default value, and nothing is declared twice over."""
    defaults = yaml.safe_load((ANSIBLE / "roles" / role / "defaults" / "main.yml").read_text())
    options = yaml.safe_load((ANSIBLE / "roles" / role / "meta" / "argument_specs.yml").read_text())[
        "argument_specs"]["main"]["options"]
    assert set(defaults) == set(options)
    for name, value in defaults.items():
        assert name.startswith(f"{role}_"), f"{name} lacks the role prefix"
        assert options[name]["default"] == value, name
        assert options[name].get("description"), name


def _plain(value):
    """ansible-inventory marks inventory strings as {"__ansible_unsafe": ...}; unwrap them."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def test_spec_inventory_has_groups_and_host_vars():
    result = _run([str(BIN / "ansible-inventory"), "-i", "vagrant/cluster.yaml", "--list"],
                  ANSIBLE_INVENTORY_UNPARSED_FAILED="1")
    assert result.returncode == 0, result.stderr
    inventory = _plain(json.loads(result.stdout))
    assert inventory["nats_servers"]["hosts"] == ["node1", "node2", "node3"]
    assert inventory["marmot_nodes"]["hosts"] == ["node1", "node2", "node3"]
    node2 = inventory["_meta"]["hostvars"]["node2"]
    assert node2["ansible_host"] == "10.77.0.12"
    assert node2["ansible_user"] == "vagrant" and node2["ansible_become"] is True
    assert node2["marmot_node_health_url"] == "http://127.0.0.1:9470/health"
    # The spec copied to hosts is the fully defaulted one.
    spec = node2["marmot_node_cluster_spec"]
    assert spec["replication"]["max_log_entries"] == 100000
    assert spec["nodes"][1]["ports"]["metrics"] == 9470
    assert "password" not in json.dumps(inventory).lower().replace("password_file", "")


def test_invalid_spec_is_reported_with_its_location(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text(
        "apiVersion: marmot-appliance/v1\nkind: Cluster\nname: bad\n"
        "nodes:\n  - {name: n1, id: 1, host: 10.77.0.11, db: relative.db, colour: blue}\n"
    )
    result = _run([str(BIN / "ansible-inventory"), "-i", str(bad), "--list"], ANSIBLE_INVENTORY_UNPARSED_FAILED="1")
    assert result.returncode != 0
    assert "colour" in result.stderr and "cluster.yaml:5" in result.stderr


@pytest.mark.parametrize("playbook", ["site.yml", "status.yml", "destroy.yml"])
def test_playbook_syntax_check_with_spec_inventory(playbook):
    result = _run([str(BIN / "ansible-playbook"), "-i", "vagrant/cluster.yaml", f"ansible/{playbook}", "--syntax-check"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_filter_renders_a_server_config_nats_server_accepts(tmp_path):
    """The filter the role uses renders through server_config_for; nats-server -t accepts it."""
    state = tmp_path / "state"
    expression = (
        "{{ marmot_spec_path | marmot_nats_server_config('node2', '/var/lib/marmot-appliance/nats', "
        f"'{state}') }}}}"
    )
    result = _run([str(BIN / "ansible"), "-i", "vagrant/cluster.yaml", "node2", "-m", "ansible.builtin.debug",
                   "-a", f"msg={expression}", "-o"])
    assert result.returncode == 0, result.stdout + result.stderr
    text = json.loads(result.stdout.split("=>", 1)[1])["msg"]
    assert '"vagrant-node2"' in text and "10.77.0.11:6222" in text and "10.77.0.13:6222" in text
    config = tmp_path / "nats-server.conf"
    config.write_text(text)
    check_config_file(config)
    credentials = json.loads((state / "secrets" / "nats-credentials.json").read_text())
    assert all(entry["password"] in text for entry in credentials["nodes"].values())  # one identity per node
    assert credentials["reader"]["password"] in text
    assert (state / "secrets" / "nats-credentials.json").stat().st_mode & 0o777 == 0o600
    route = json.loads((state / "secrets" / "nats-route.json").read_text())
    cluster_block = text[text.index("cluster {"):]
    assert route["password"] in cluster_block
    assert not any(entry["password"] in cluster_block for entry in credentials["nodes"].values())
