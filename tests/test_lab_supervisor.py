"""The supervisor fallback on a real lab host: site.yml with deploy.service_manager: supervisor.

docs/deploy.md documents supervisord for hosts without systemd; this deploys a one-host cluster
that way (no systemd units), checks that both programs run under supervisord and the node is
healthy and publishing, then `marmot-appliance destroy` stops both programs. Needs root and the
lab packages, like tests/test_lab_deploy.py (fails under MARMOT_REQUIRE_LAB=1).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_lab_deploy import Lab, lab_for

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "tests" / "specs" / "lab-supervisor.yaml"
SUPERVISORCTL = "/opt/marmot-appliance/venv/bin/supervisorctl -c /opt/marmot-appliance/supervisord.conf"

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from lab_for(SPEC, tmp_path_factory, extra_requirements=["supervisor"])


def _programs(lab: Lab) -> dict[str, str]:
    # supervisorctl status exits 3 when a program is not running: read stdout only.
    from marmot_appliance.lab.ssh import ssh_command

    out = subprocess.run(ssh_command(lab.topology, "solo", f"{SUPERVISORCTL} status"), capture_output=True,
                         text=True, timeout=60, check=False).stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}


def test_site_yml_runs_both_services_under_supervisord(lab):
    _, recap = lab.playbook(SPEC)
    assert recap["solo"]["failed"] == 0 and recap["solo"]["unreachable"] == 0
    assert _programs(lab) == {"marmot-node": "RUNNING", "nats-server": "RUNNING"}
    units = lab.ssh("solo", "ls /etc/systemd/system/ | grep -c -E '^(marmot-node|nats-server)\\.service$' || true")
    assert units.strip() == "0"  # no systemd units: supervisord runs them
    assert lab.health("solo")["status"] == "ok"
    lab.execute("solo", "CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, origin TEXT, n INTEGER)")
    time.sleep(1)  # the node notices the new table (schema check every 0.5 s)
    lab.execute("solo", "INSERT INTO items VALUES (?, ?, ?)", ["under-supervisor", "solo", 1])
    deadline = time.monotonic() + 60
    while lab.health("solo")["last_publish"] is None and time.monotonic() < deadline:
        time.sleep(1)
    health = lab.health("solo")
    assert health["last_publish"] is not None and health["pending_rows"] == 0, health


def test_a_killed_node_is_restarted_by_supervisord(lab):
    pid = lab.ssh("solo", f"{SUPERVISORCTL} pid marmot-node").strip()
    lab.ssh("solo", f"kill -9 {pid}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        programs = _programs(lab)
        new_pid = lab.ssh("solo", f"{SUPERVISORCTL} pid marmot-node").strip()
        if programs.get("marmot-node") == "RUNNING" and new_pid not in ("0", pid):
            break
        time.sleep(1)
    assert programs.get("marmot-node") == "RUNNING" and new_pid != pid, programs


def test_destroy_stops_the_supervised_programs(lab):
    result = subprocess.run(
        ["ip", "netns", "exec", lab.topology.controller_namespace, sys.executable, "-m", "marmot_appliance",
         "destroy", str(SPEC)],
        capture_output=True, text=True, env=lab.env, timeout=600, cwd=REPO, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert _programs(lab) == {"marmot-node": "STOPPED", "nats-server": "STOPPED"}
    assert "under-supervisor" in lab.ids("solo")  # the database is kept
