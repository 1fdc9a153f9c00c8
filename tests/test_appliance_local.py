"""The local appliance end to end: real nats-servers, real node runtimes, real SQLite files.

One test walks the life of a 3-node cluster on 127.0.0.1, as an unprivileged user when the
suite runs as root: apply, convergence of writes made on every node, status, idempotent apply,
a one-node spec edit, a killed nats-server, credentials enforcement, /metrics and /health,
NATS loss and recovery, destroy and destroy --purge. Every wait polls with a generous deadline;
nothing is timed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from marmot_appliance.appliance.state import ProcessRecord
from marmot_appliance.appliance.supervisor import is_running
from tests.test_appliance_support import (
    chown_tree,
    describe,
    make_workdir,
    run_cli,
    spec_data,
    unprivileged_user,
    write_spec,
)

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE items (id TEXT PRIMARY KEY, origin TEXT NOT NULL, qty INTEGER, payload BLOB);
CREATE TABLE sessions (token TEXT PRIMARY KEY, note TEXT);
"""
CONVERGE_TIMEOUT_S = 90.0
HEALTH_TIMEOUT_S = 90.0


# -- helpers ------------------------------------------------------------------------------------


class Appliance:
    """The cluster under test, seen from outside: spec file, state dir, CLI, databases."""

    def __init__(self, workdir: Path, data: dict):
        self.workdir = workdir
        self.data = data
        self.spec = write_spec(workdir, data)
        self.state_dir = workdir / ".marmot-appliance" / data["name"]

    def cli(self, *args: str):
        return run_cli(self.workdir, *args)

    def rewrite_spec(self) -> None:
        self.spec = write_spec(self.workdir, self.data)

    def db(self, node: str) -> Path:
        entry = next(n for n in self.data["nodes"] if n["name"] == node)
        return self.workdir / entry["db"]

    def node_names(self) -> list[str]:
        return [n["name"] for n in self.data["nodes"]]

    def ports(self, node: str) -> dict:
        return next(n for n in self.data["nodes"] if n["name"] == node)["ports"]

    def records(self) -> dict[str, ProcessRecord]:
        data = json.loads((self.state_dir / "state.json").read_text())
        return {name: ProcessRecord.from_dict(rec) for name, rec in data["processes"].items()}

    def pids(self) -> dict[str, int]:
        return {name: rec.pid for name, rec in self.records().items()}

    def credentials(self, node: str = "n1") -> tuple[str, str]:
        """A node's own generated identity (user, password)."""
        data = json.loads((self.state_dir / "secrets" / "nats-credentials.json").read_text())
        return data["nodes"][node]["user"], data["nodes"][node]["password"]

    def reader_credentials(self) -> tuple[str, str]:
        """The read-only identity apply writes out for watch and feed readers."""
        data = json.loads((self.state_dir / "secrets" / "nats-reader.json").read_text())
        return data["user"], data["password"]

    def http(self, node: str, path: str) -> tuple[int | None, bytes]:
        url = f"http://127.0.0.1:{self.ports(node)['metrics']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return None, b""


def create_databases(appliance: Appliance) -> None:
    for node in appliance.node_names():
        path = appliance.db(node)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        conn.commit()
        conn.close()
    chown_tree(appliance.workdir)


def write_rows(path: Path, origin: str, count: int, start: int = 0) -> None:
    """An application writing with plain sqlite3 (root-created WAL files are chowned by SQLite)."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        for i in range(start, start + count):
            with conn:
                conn.execute(
                    "INSERT INTO items (id, origin, qty, payload) VALUES (?, ?, ?, ?)",
                    (f"{origin}-{i}", origin, i, bytes([i % 256]) * 3),
                )
    finally:
        conn.close()


def table_digest(path: Path, table: str = "items") -> tuple[int, str]:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()
    finally:
        conn.close()
    return len(rows), hashlib.sha256(repr(rows).encode()).hexdigest()


def wait_converged(appliance: Appliance, expected_rows: int) -> None:
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    digests: dict[str, tuple[int, str]] = {}
    while time.monotonic() < deadline:
        digests = {node: table_digest(appliance.db(node)) for node in appliance.node_names()}
        if len(set(digests.values())) == 1 and next(iter(digests.values()))[0] == expected_rows:
            return
        time.sleep(0.5)
    pytest.fail(f"databases did not converge to {expected_rows} rows: {digests}\n{logs(appliance)}")


def wait_health(appliance: Appliance, node: str, want_status: int) -> dict:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    status, body = None, b""
    while time.monotonic() < deadline:
        status, body = appliance.http(node, "/health")
        if status == want_status:
            return json.loads(body)
        time.sleep(0.3)
    pytest.fail(f"{node} /health stayed {status} (wanted {want_status}): {body!r}\n{logs(appliance)}")


def logs(appliance: Appliance) -> str:
    out = []
    for log in sorted((appliance.state_dir / "logs").glob("*.log")):
        out.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:])
    return "\n".join(out)


def assert_ok(result, *expected: str) -> None:
    assert result.returncode == 0, describe(result)
    for text in expected:
        assert text in result.stdout, describe(result)


def status_json(appliance: Appliance) -> tuple[int, dict]:
    result = appliance.cli("status", str(appliance.spec), "--output", "json")
    assert "Traceback" not in result.stderr, describe(result)
    return result.returncode, json.loads(result.stdout)


async def nats_probe(url: str, user: str, password: str) -> None:
    with pytest.raises(Exception) as refused:
        await nats.connect(url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0)
    assert "authorization" in str(refused.value).lower()
    with pytest.raises(Exception):
        await nats.connect(
            url, user=user, password=password + "x", connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0
        )
    nc = await nats.connect(url, user=user, password=password, connect_timeout=5)
    try:
        info = await nc.jetstream().account_info()
        assert info.streams >= 1  # the nodes created their shard stream(s)
    finally:
        await nc.close()


def emergency_stop(appliance: Appliance) -> None:
    """Teardown fallback when the CLI itself failed: stop recorded processes by PID."""
    try:
        records = appliance.records()
    except (OSError, ValueError, KeyError):
        return
    for record in records.values():
        if is_running(record):
            os.kill(record.pid, signal.SIGKILL)


@pytest.fixture
def appliance():
    workdir = make_workdir()
    data = spec_data()
    # Applications that manage their own schema (create_databases below) need no `schema:`.
    data.pop("schema", None)
    app = Appliance(workdir, data)
    try:
        yield app
    finally:
        result = app.cli("destroy", str(app.spec), "--purge")
        emergency_stop(app)
        shutil.rmtree(workdir, ignore_errors=True)
        assert result.returncode == 0, describe(result)


# -- the test -----------------------------------------------------------------------------------


def test_local_appliance_lifecycle(appliance: Appliance):
    create_databases(appliance)
    spec = str(appliance.spec)

    # apply brings up 3 nats-servers and 3 node runtimes, all healthy.
    result = appliance.cli("apply", spec)
    assert_ok(result, "Apply complete", "+ nats-server/n1", "+ node/n3")
    first_pids = appliance.pids()
    assert sorted(first_pids) == sorted(f"{k}/{n}" for k in ("nats-server", "node") for n in ("n1", "n2", "n3"))
    user = unprivileged_user()
    if user is not None:  # really ran without root
        for pid in first_pids.values():
            uid_line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                            if line.startswith("Uid:"))
            assert int(uid_line.split()[1]) == user.pw_uid
    secret_user, password = appliance.credentials()
    assert password not in result.stdout + result.stderr

    # Rows written into each node's database converge on all three.
    for node in appliance.node_names():
        write_rows(appliance.db(node), node, 20)
    wait_converged(appliance, 60)

    # status: all healthy, zero lag once writes stopped.
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    code, status = status_json(appliance)
    while time.monotonic() < deadline:
        lags = [v for n in status["nodes"] for v in ((n["health"] or {}).get("lag") or {"?": None}).values()]
        if code == 0 and lags and all(lag == 0 for lag in lags):
            break
        time.sleep(0.5)
        code, status = status_json(appliance)
    assert code == 0 and status["healthy"], json.dumps(status, indent=2)
    for node in status["nodes"]:
        assert node["runtime"]["pid"] == first_pids[f"node/{node['node']}"]
        assert node["health"]["nats"]["connected"] is True
        assert node["health"]["lag"] and set(node["health"]["lag"].values()) == {0}
        assert node["health"]["dead_letters"] == 0
    text = appliance.cli("status", spec)
    assert_ok(text, "3 of 3 nodes healthy")
    assert password not in text.stdout

    # /metrics parses with the Prometheus parser and counts the replicated rows.
    code, raw = appliance.http("n1", "/metrics")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    published = sum(s.value for s in families["marmot_rows_published"].samples if s.name.endswith("_total"))
    applied = sum(s.value for s in families["marmot_rows_applied"].samples if s.name.endswith("_total"))
    assert published >= 20 and applied >= 40
    assert "marmot_stream_lag" in families

    # A second apply changes nothing.
    again = appliance.cli("apply", spec)
    assert_ok(again, "No changes.")
    assert "started" not in again.stdout
    assert appliance.pids() == first_pids
    assert all(is_running(rec) for rec in appliance.records().values())

    # Clients need the generated credentials.
    url = f"nats://127.0.0.1:{appliance.ports('n1')['client']}"
    asyncio.run(asyncio.wait_for(nats_probe(url, secret_user, password), timeout=60))

    # Changing one node's setting affects only that node.
    appliance.data["nodes"][2]["tables"] = {"exclude": ["sessions"]}
    appliance.rewrite_spec()
    plan = appliance.cli("plan", spec, "--detailed-exitcode")
    assert plan.returncode == 2, describe(plan)
    assert "~ node/n3" in plan.stdout and "node settings changed" in plan.stdout
    for other in ("node/n1", "node/n2", "nats-server/"):
        assert other not in plan.stdout, describe(plan)
    plan_json = json.loads(appliance.cli("plan", spec, "--output", "json").stdout)
    assert [(c["resource"], c["action"]) for c in plan_json["changes"]] == [("node/n3", "update")]
    edited = appliance.cli("apply", spec)
    assert_ok(edited, "Apply complete")
    after_edit = appliance.pids()
    assert after_edit["node/n3"] != first_pids["node/n3"]
    assert {k: v for k, v in after_edit.items() if k != "node/n3"} == {
        k: v for k, v in first_pids.items() if k != "node/n3"
    }
    assert_ok(appliance.cli("plan", spec, "--detailed-exitcode"), "No changes.")

    # A nats-server setting restarts the servers one at a time (rolling), no node runtime.
    appliance.data.setdefault("nats", {})["jetstream"] = {"max_memory": "128MB"}
    appliance.rewrite_spec()
    plan_json = json.loads(appliance.cli("plan", spec, "--output", "json").stdout)
    assert [(c["resource"], c["reasons"]) for c in plan_json["changes"]] == [
        (f"nats-server/n{i}", ["nats-server configuration changed"]) for i in (1, 2, 3)
    ]
    rolled = appliance.cli("apply", spec)
    assert_ok(rolled, "Apply complete")
    steps = [line.split()[:2] for line in rolled.stdout.splitlines() if line.strip().startswith(("stopped", "started"))]
    assert steps == [[verb, f"nats-server/n{i}"] for i in (1, 2, 3) for verb in ("stopped", "started")]
    after_roll = appliance.pids()
    for name, pid in after_roll.items():
        assert (pid != after_edit[name]) == name.startswith("nats-server/"), name
    after_edit = after_roll

    # kill -9 one nats-server: apply brings it back and the cluster converges.
    victim = appliance.records()["nats-server/n2"]
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while is_running(victim) and time.monotonic() < deadline:
        time.sleep(0.05)
    plan = appliance.cli("plan", spec, "--detailed-exitcode")
    assert plan.returncode == 2 and "~ nats-server/n2" in plan.stdout and "not running" in plan.stdout, describe(plan)
    revived = appliance.cli("apply", spec)
    assert_ok(revived, "Apply complete")
    after_kill = appliance.pids()
    assert after_kill["nats-server/n2"] != victim.pid
    assert {k: v for k, v in after_kill.items() if k != "nats-server/n2"} == {
        k: v for k, v in after_edit.items() if k != "nats-server/n2"
    }
    for node in appliance.node_names():
        write_rows(appliance.db(node), node, 5, start=100)
    wait_converged(appliance, 75)

    # Losing NATS makes /health unhealthy; apply restores the servers and health.
    for name, record in appliance.records().items():
        if name.startswith("nats-server/"):
            os.kill(record.pid, signal.SIGTERM)
    body = wait_health(appliance, "n1", 503)
    assert body["status"] == "unhealthy" and body["nats"]["connected"] is False
    code, status = status_json(appliance)
    assert code == 1 and not status["healthy"]
    healed = appliance.cli("apply", spec)
    assert_ok(healed, "Apply complete", "~ nats-server/n1")
    for node in appliance.node_names():
        assert wait_health(appliance, node, 200)["nats"]["connected"] is True
    write_rows(appliance.db("n3"), "n3", 5, start=200)
    wait_converged(appliance, 80)

    # No secret in any log the appliance keeps.
    for log in (appliance.state_dir / "logs").glob("*.log"):
        assert password not in log.read_text(errors="replace"), log

    # destroy leaves no process behind and keeps the data; --purge removes the state dir only.
    records = appliance.records()
    destroyed = appliance.cli("destroy", spec)
    assert_ok(destroyed, "stopped node/n1")
    assert not any(is_running(rec) for rec in records.values())
    for rec in records.values():
        assert not Path(f"/proc/{rec.pid}").exists() or not is_running(rec)
    assert appliance.state_dir.is_dir()
    purged = appliance.cli("destroy", spec, "--purge")
    assert_ok(purged, "Removed state directory")
    assert not appliance.state_dir.exists()
    assert table_digest(appliance.db("n1"))[0] == 80  # user data kept


# -- external NATS, node removal and --prune ----------------------------------------------------


def test_external_nats_and_prune(nats_cluster):
    """nats.embedded: false runs only node runtimes; a node removed from the spec keeps running
    until `apply --prune`, and removing it touches no other process."""
    workdir = make_workdir()
    data = spec_data()
    data["nats"] = {"embedded": False, "urls": nats_cluster.urls, "auth": "none"}
    app = Appliance(workdir, data)
    n3_record = None
    try:
        create_databases(app)
        spec = str(app.spec)
        assert_ok(app.cli("apply", spec), "Apply complete", "+ node/n1")
        pids = app.pids()
        assert sorted(pids) == ["node/n1", "node/n2", "node/n3"]  # no nats-server of ours
        for node in app.node_names():
            write_rows(app.db(node), node, 10)
        wait_converged(app, 30)

        app.data["nodes"] = app.data["nodes"][:2]
        app.rewrite_spec()
        n3_record = app.records()["node/n3"]
        kept = app.cli("apply", spec)
        assert_ok(kept, "No changes.", "node/n3 is no longer in the spec", "--prune")
        assert app.pids() == pids and is_running(n3_record)

        plan = app.cli("plan", spec, "--prune", "--detailed-exitcode")
        assert plan.returncode == 2 and "- node/n3" in plan.stdout, describe(plan)
        pruned = app.cli("apply", spec, "--prune")
        assert_ok(pruned, "- node/n3", "stopped node/n3", "1 removed")
        assert app.pids() == {k: v for k, v in pids.items() if k != "node/n3"}
        assert not is_running(n3_record)
        write_rows(app.db("n1"), "n1", 5, start=50)
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while table_digest(app.db("n2")) != table_digest(app.db("n1")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert table_digest(app.db("n2")) == table_digest(app.db("n1")) and table_digest(app.db("n1"))[0] == 35
    finally:
        result = app.cli("destroy", str(app.spec), "--purge")
        emergency_stop(app)
        if n3_record is not None and is_running(n3_record):  # prune failed: do not leak it
            os.kill(n3_record.pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
    assert result.returncode == 0, describe(result)
