"""The declared schema through ansible/site.yml on real systemd hosts (docs/schema.md).

It runs on the three hosts of tests/test_lab_deploy.py (the session's `vagrant_lab`, so the
lab is brought up and the packages installed once for both modules): the hosts are first reset
to "packages installed, nothing deployed" (services, configuration, state, databases removed),
then site.yml deploys another cluster (`schemalab`) whose `schema:` declares `notes` (no
CREATE TABLE on any host); then,
while an application writes on every host, the schema file gains a column and a table and
site.yml runs again: the serial play migrates one host at a time, no node restarts, the writers
start using the new column as soon as their own host has it, and all hosts end with equal
digests (replication/digest.py). Needs root and the lab packages; skips with the reason
otherwise (fails under MARMOT_REQUIRE_LAB=1). The writers are bounded in count and time.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.test_lab_deploy import DB, HOST_PYTHON, SPEC

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(3600)]

HOSTS = ["node1", "node2", "node3"]
CONVERGE_TIMEOUT_S = 180
NOTES = "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT);\n"
ROLLOUT = (
    "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, tag TEXT NOT NULL DEFAULT 'none');\n"
    "CREATE TABLE orders (id TEXT PRIMARY KEY, note_id TEXT, total REAL DEFAULT 0);\n"
    "CREATE INDEX notes_by_tag ON notes (tag);\n"
)
# An application on one host: upserts notes (and, once its database has them, the new column
# and table) until the stop file exists and it has used the new schema 20 times; at most 10
# minutes and 100,000 writes. Prints "<writes> <writes with the new schema>".
WRITER = """
import os, sqlite3, sys, time
db, name, stop = sys.argv[1], sys.argv[2], sys.argv[3]
conn = sqlite3.connect(db, timeout=30)
written = used_new = 0
deadline = time.monotonic() + 600
while written < 100000 and time.monotonic() < deadline:
    if os.path.exists(stop) and used_new >= 20:
        break
    migrated = "tag" in [row[1] for row in conn.execute("PRAGMA table_info(notes)")]
    with conn:
        key = f"{name}-{written % 50}"
        if migrated:
            conn.execute("INSERT INTO notes (id, body, tag) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE "
                         "SET body = excluded.body, tag = excluded.tag", (key, f"{name} {written}", f"t{written % 3}"))
            conn.execute("INSERT OR REPLACE INTO orders (id, note_id, total) VALUES (?, ?, ?)",
                         (f"{name}-o{written % 20}", key, written * 1.5))
            used_new += 1
        else:
            conn.execute("INSERT INTO notes (id, body) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                         (key, f"{name} {written}"))
        conn.execute("INSERT OR REPLACE INTO notes (id, body) VALUES ('shared', ?)", (f"{name} {written}",))
    written += 1
    time.sleep(0.05)
print(written, used_new)
"""
DIGEST = (
    "import json\nfrom marmot_appliance.replication.digest import table_digest\n"
    f"print(json.dumps(table_digest({DB!r}, ['notes', 'orders'])))\n"
)
COLUMNS = (
    "import json, sqlite3\n"
    f"c = sqlite3.connect({DB!r}, timeout=30)\n"
    "print(json.dumps({t: [r[1] for r in c.execute(f'PRAGMA table_info({t})')] for t in ('notes', 'orders')}))\n"
)


@pytest.fixture(scope="module")
def schema_spec(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("schemalab-spec")
    data = yaml.safe_load(SPEC.read_text())
    data["name"] = "schemalab"
    data["schema"] = ["schema.sql"]
    data["verify"] = {"interval_s": None}  # the test compares digests itself
    (directory / "schema.sql").write_text(NOTES)
    spec = directory / "cluster.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec


# What site.yml and the deploy module left on a host, but the installed packages (/opt).
RESET = ("systemctl disable --now marmot-node nats-server 2>/dev/null; "
         "rm -rf /var/lib/marmot-appliance /etc/marmot-appliance /etc/nats-server "
         "/etc/systemd/system/marmot-node.service /etc/systemd/system/nats-server.service; "
         "systemctl daemon-reload")


@pytest.fixture(scope="module")
def lab(vagrant_lab, tmp_path_factory):
    for host in HOSTS:
        vagrant_lab.ssh(host, RESET)
    # Another cluster: its own controller state (secrets), as a separate deployment would have.
    return dataclasses.replace(vagrant_lab, controller_state=tmp_path_factory.mktemp("schemalab-controller-state"))


def test_site_yml_rolls_a_schema_change_out_while_every_host_writes(lab, schema_spec):
    from marmot_appliance.lab.ssh import ssh_command

    # The wheelhouse is as the session's lab built it (no second wheel build).
    lab.playbook(schema_spec, "-e", "marmot_packages_build_wheelhouse=false")
    for host in HOSTS:
        assert json.loads(lab.python(host, COLUMNS)) == {"notes": ["id", "body"], "orders": []}

    stop_file = "/tmp/marmot-schema-writer.stop"
    writers = {}
    for host in HOSTS:
        lab.ssh(host, f"rm -f {stop_file}")
        lab.ssh(host, "cat > /tmp/marmot-schema-writer.py", input_text=WRITER)
        writers[host] = subprocess.Popen(
            ssh_command(lab.topology, host, f"{HOST_PYTHON} /tmp/marmot-schema-writer.py {DB} {host} {stop_file}"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    try:
        (schema_spec.parent / "schema.sql").write_text(ROLLOUT)
        result, recap = lab.playbook(schema_spec, "-e", "marmot_packages_build_wheelhouse=false")
    finally:
        for host in HOSTS:
            lab.ssh(host, f"touch {stop_file}")
        outputs = {host: writer.communicate(timeout=700) for host, writer in writers.items()}
    for host, (out, err) in outputs.items():
        assert writers[host].returncode == 0, f"{host} writer failed: {err}"
        written, used_new = map(int, out.split())
        assert written > used_new >= 20, (host, out)

    # The schema task ran on one host after the other, and no node restarted for it.
    rolling = result.stdout[result.stdout.index("PLAY [Rolling restart"):]
    migrated = re.findall(r"TASK \[marmot_node : Apply the declared schema to the node's database\].*?\n"
                          r"(?:.*\n)*?changed: \[(node\d)\]", rolling)
    assert migrated == HOSTS, rolling[-4000:]
    assert "TASK [Restart the node if its configuration changed]" in rolling  # the rolling play ran ...
    assert "TASK [marmot_service : Restart under systemd marmot-node]" not in rolling  # ... restarting nothing
    for host in HOSTS:
        assert json.loads(lab.python(host, COLUMNS)) == {
            "notes": ["id", "body", "tag"], "orders": ["id", "note_id", "total"],
        }

    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    digests = {}
    while time.monotonic() < deadline:
        digests = {host: json.loads(lab.python(host, DIGEST)) for host in HOSTS}
        if all(digest == digests["node1"] for digest in digests.values()):
            break
        time.sleep(2)
    assert all(digest == digests["node1"] for digest in digests.values()), (digests, lab.diagnostics(HOSTS))
    assert digests["node1"]["orders"] != "missing"

    # Every host reports the same schema fingerprints; a third run changes nothing.
    fingerprints = [lab.health(host)["schema"]["tables"] for host in HOSTS]
    assert fingerprints[0] == fingerprints[1] == fingerprints[2] and set(fingerprints[0]) == {"notes", "orders"}
    _, recap = lab.playbook(schema_spec, "-e", "marmot_packages_build_wheelhouse=false")
    assert all(counts.get("changed") == 0 for host, counts in recap.items() if host in HOSTS), recap


def test_lab_down_leaves_nothing_behind(lab):
    from marmot_appliance.lab.lifecycle import lab_down
    from marmot_appliance.lab.network import NETNS_DIR, blackhole_present

    pids = [record["pid"] for record in json.loads((lab.topology.state_dir / "state.json").read_text())["containers"].values()]
    lab_down(lab.topology, progress=lambda _m: None)
    lab_down(lab.topology, progress=lambda _m: None)  # idempotent
    assert not any(NETNS_DIR.glob(f"mlab-{lab.topology.lab}-*")) if NETNS_DIR.is_dir() else True
    assert not blackhole_present()
    assert str(lab.topology.state_dir) not in Path("/proc/self/mounts").read_text()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not lab.topology.state_dir.exists()
