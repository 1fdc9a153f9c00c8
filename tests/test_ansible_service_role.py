"""The shared marmot_service role: one start/restart/stop logic for nats_server and marmot_node,
role-prefixed tags, destroy.yml through the roles' uninstall tasks — checked on the files, and
the restart decisions run for real on localhost against a stand-in supervisorctl."""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ROLES_DIR = REPO / "ansible" / "roles"
BIN = REPO / ".venv" / "bin"
SERVICE_ROLES = ("nats_server", "marmot_node")
SHARED = ROLES_DIR / "marmot_service" / "tasks"


def _tasks(path: Path) -> list[dict[str, Any]]:
    """Every task of a task file, blocks flattened."""
    found: list[dict[str, Any]] = []
    for task in yaml.safe_load(path.read_text()) or []:
        found.append(task)
        for key in ("block", "rescue", "always"):
            found.extend(task.get(key, []))
    return found


@pytest.mark.parametrize("role", SERVICE_ROLES)
def test_each_role_hands_the_shared_role_every_parameter_it_reads(role: str) -> None:
    params = yaml.safe_load((ROLES_DIR / role / "vars" / "main.yml").read_text())[f"{role}_service"]
    read = {name for path in SHARED.glob("*.yml") for name in re.findall(r"marmot_service_params\.(\w+)", path.read_text())}
    assert set(params) == read


@pytest.mark.parametrize("role", SERVICE_ROLES)
def test_only_the_shared_role_starts_restarts_or_stops_services(role: str) -> None:
    for path in [*(ROLES_DIR / role / "tasks").glob("*.yml"), ROLES_DIR / role / "handlers" / "main.yml"]:
        for task in _tasks(path):
            assert "ansible.builtin.systemd_service" not in task, (path.name, task["name"])
            assert "supervisorctl" not in str(task.get("ansible.builtin.command", "")), (path.name, task["name"])


def test_handler_includes_cannot_be_shadowed_by_a_callers_task_file() -> None:
    """A handler includes notified.yml by path in its own role, where a relative include looks in
    that role's tasks/ first: the files notified.yml reaches must not exist there."""
    reached: set[str] = set()
    todo = ["notified.yml"]
    while todo:
        name = todo.pop()
        for task in _tasks(SHARED / name):
            included = task.get("ansible.builtin.include_tasks")
            if included and included not in reached:
                reached.add(included)
                todo.append(included)
    assert reached == {"restart.yml", "wait_healthy.yml"}
    for role in SERVICE_ROLES:
        assert not [name for name in reached if (ROLES_DIR / role / "tasks" / name).exists()], role
        handlers = _tasks(ROLES_DIR / role / "handlers" / "main.yml")
        assert [h["ansible.builtin.include_tasks"] for h in handlers] == [
            "{{ role_path }}/../marmot_service/tasks/notified.yml"]


@pytest.mark.parametrize("role", ["marmot_packages", *SERVICE_ROLES])
def test_tags_carry_the_role_prefix(role: str) -> None:
    tags: set[str] = set()
    for path in (ROLES_DIR / role / "tasks").glob("*.yml"):
        for task in _tasks(path):
            tags.update(task.get("tags", []))
            for key in ("ansible.builtin.include_tasks", "ansible.builtin.include_role"):
                if isinstance(task.get(key), dict):
                    tags.update(task[key].get("apply", {}).get("tags", []))
    assert tags
    assert all(tag.startswith(f"{role}_") for tag in tags), tags


def test_site_yml_lists_the_prefixed_tags() -> None:
    result = subprocess.run([str(BIN / "ansible-playbook"), "-i", "vagrant/cluster.yaml", "ansible/site.yml", "--list-tags"],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible" / "ansible.cfg")))
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"\b\w+_(?:install|configure|service)\b", result.stdout))
    assert listed == {f"{role}_{tag}" for role in SERVICE_ROLES for tag in ("install", "configure", "service")}


def test_destroy_yml_only_calls_the_roles_uninstall_tasks() -> None:
    plays = yaml.safe_load((REPO / "ansible" / "destroy.yml").read_text())
    called = []
    for play in plays:
        for task in play["tasks"]:
            assert set(task) == {"name", "ansible.builtin.include_role", "vars"}, task
            called.append((play["hosts"], task["ansible.builtin.include_role"]["name"],
                           task["ansible.builtin.include_role"]["tasks_from"]))
    assert called == [("marmot_nodes", "marmot_node", "uninstall.yml"), ("nats_servers", "nats_server", "uninstall.yml")]


# ---- the restart decisions, run ---------------------------------------------------------------

SUPERVISORCTL = """#!/bin/sh
# Stand-in for supervisorctl: logs its command; `update` adds the program once (like the real one).
dir=$(dirname "$0")
shift 2  # -c CONFIG
echo "$*" >> "$dir/calls.log"
if [ "$1" = update ] && [ ! -e "$dir/running" ]; then touch "$dir/running"; echo "$2: added process group"; fi
"""

PLAYBOOK = """
- name: One service through marmot_service, as nats_server and marmot_node use it
  hosts: localhost
  gather_facts: false
  vars:
    demo_service: {name: demo, manager: supervisor, install_dir: "%(install_dir)s", health_url: "%(url)s",
                   health_retries: 5, health_delay_s: 1, restart_strategy: "%(strategy)s"}
  tasks:
    - name: Start
      ansible.builtin.include_role: {name: marmot_service, tasks_from: start.yml}
      vars: {marmot_service_params: "{{ demo_service }}"}
    - name: Change the configuration
      ansible.builtin.command: "true"
      changed_when: true
      notify: Restart demo
    - name: Run the handlers
      ansible.builtin.meta: flush_handlers
    - name: Mark the rolling play
      ansible.builtin.shell: echo rolling >> "%(install_dir)s/venv/bin/calls.log"
      changed_when: false
    - name: Rolling restart
      ansible.builtin.include_role: {name: marmot_service, tasks_from: rolling_restart.yml}
      vars: {marmot_service_params: "{{ demo_service }}"}
  handlers:
    - name: Restart demo
      ansible.builtin.include_tasks: "%(roles)s/marmot_service/tasks/notified.yml"
      vars: {marmot_service_params: "{{ demo_service }}"}
"""


@pytest.fixture(scope="module")
def health_url() -> Iterator[str]:
    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server hook's name)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health"
    server.shutdown()


@pytest.mark.parametrize(("strategy", "running_before", "expected"), [
    # rolling: the handler only flags; the rolling play restarts a service that was running.
    ("rolling", True, ["update demo", "rolling", "restart demo"]),
    # a service this run started needs no restart, whatever changed.
    ("rolling", False, ["update demo", "rolling"]),
    ("immediate", False, ["update demo", "rolling"]),
    # immediate: the handler restarts at once (and flags it, as the rolling play may follow).
    ("immediate", True, ["update demo", "restart demo", "rolling", "restart demo"]),
    ("never", True, ["update demo", "rolling"]),
])
def test_restart_decisions(tmp_path: Path, health_url: str, strategy: str, running_before: bool,
                           expected: list[str]) -> None:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "supervisorctl").write_text(SUPERVISORCTL)
    (bin_dir / "supervisorctl").chmod(0o755)
    if running_before:
        (bin_dir / "running").touch()
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAYBOOK % {"install_dir": tmp_path, "url": health_url, "strategy": strategy, "roles": ROLES_DIR})
    result = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook),
                             "-e", f"ansible_python_interpreter={sys.executable}"],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, ANSIBLE_ROLES_PATH=str(ROLES_DIR), ANSIBLE_NOCOLOR="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (bin_dir / "calls.log").read_text().split("\n")[:-1] == expected
