"""The role's marmot_schema module, run by ansible-playbook on this machine (connection local)
against a real SQLite file: check mode reports each change as the plan shows it under a host,
a real run migrates, a second run changes nothing, an incompatible change fails the task with
SQLite's refusal and changes nothing. No hosts, no root (the lab test runs it on real hosts)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from marmot_appliance.deploy.remote import RemotePlan, render_plan

REPO = Path(__file__).resolve().parents[1]
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"


def _playbook(tmp_path: Path, db: Path, schema: str, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    marmot = tmp_path / "marmot-appliance"
    marmot.write_text(f"#!/bin/sh\nexec {sys.executable} -m marmot_appliance \"$@\"\n")
    marmot.chmod(0o755)
    play = [{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": {"ansible_python_interpreter": sys.executable},
        "tasks": [{
            "name": "Apply the declared schema to the node's database",
            "marmot_schema": {"marmot": str(marmot), "db": str(db), "node": "n1",
                              "files": [{"name": "notes.sql", "content": schema}]},
        }],
    }]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    plan_file = tmp_path / "plan.json"
    plan_file.unlink(missing_ok=True)
    env = dict(
        os.environ,
        ANSIBLE_LIBRARY=str(REPO / "ansible" / "roles" / "marmot_node" / "library"),
        ANSIBLE_CALLBACK_PLUGINS=str(REPO / "ansible" / "plugins" / "callback"),
        ANSIBLE_CALLBACKS_ENABLED="marmot_plan",
        MARMOT_PLAN_FILE=str(plan_file),
        ANSIBLE_LOCALHOST_WARNING="False",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="False",
        ANSIBLE_NOCOLOR="1",
    )
    result = subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", "localhost,", str(tmp_path / "play.yml"), *extra],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    return result, json.loads(plan_file.read_text()) if plan_file.is_file() else {}


def _columns(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [row[1] for row in conn.execute("PRAGMA table_info(notes)")]
    finally:
        conn.close()


def test_marmot_schema_module_plans_applies_and_refuses(tmp_path):
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)")
    conn.close()
    rollout = "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, tag TEXT DEFAULT 'none');\n"

    checked, recorded = _playbook(tmp_path, db, rollout, "--check", "--diff")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    changes = {host: [t for t in tasks if t["status"] == "changed"] for host, tasks in recorded["hosts"].items()}
    shown = render_plan(RemotePlan(changes=changes))
    assert "    ~ Apply the declared schema to the node's database\n        schema: + column notes.tag" in shown, shown
    assert _columns(db) == ["id", "body"]  # check mode changed nothing

    applied, _ = _playbook(tmp_path, db, rollout)
    assert applied.returncode == 0 and "changed=1" in applied.stdout, applied.stdout + applied.stderr
    assert _columns(db) == ["id", "body", "tag"]
    again, _ = _playbook(tmp_path, db, rollout)
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout + again.stderr

    refused, _ = _playbook(tmp_path, db, rollout.replace("body TEXT", "body BLOB") + "CREATE TABLE later (k PRIMARY KEY);\n")
    assert refused.returncode != 0
    assert "! column notes.body: type change TEXT -> BLOB not supported" in refused.stdout, refused.stdout
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM sqlite_schema WHERE name = 'later'").fetchone() == (0,)
    conn.close()
