"""Appliance building blocks with real files and real processes, no node runtime needed:
state directory, generated credentials, the process supervisor, the plan, CLI error handling."""

from __future__ import annotations

import json
import shutil
import sqlite3
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from marmot_appliance.appliance.apply import ApplyOptions, apply_local, state_dir_of
from marmot_appliance.appliance.credentials import credentials_path, ensure_generated_credentials
from marmot_appliance.appliance.databases import prepare_databases
from marmot_appliance.appliance.errors import ApplianceError, StateLockedError
from marmot_appliance.appliance.plan import compute_plan, render_plan_json, render_plan_text
from marmot_appliance.appliance.progress import Progress
from marmot_appliance.appliance.resources import desired_resources
from marmot_appliance.appliance.state import ProcessRecord, RecordedState, StateDir
from marmot_appliance.appliance.supervisor import is_running, start_process, stop_process
from marmot_appliance.natsd.from_spec import Identity, ServerCredentials
from marmot_appliance.spec.loader import load_cluster, load_cluster_text
from marmot_appliance.spec.model import TableSelection
from tests.spec_helpers import MINIMAL
from tests.test_appliance_support import describe, make_workdir, run_cli, spec_data, write_spec


@pytest.fixture
def workdir():
    path = make_workdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spec(workdir) -> Path:
    return write_spec(workdir, spec_data())


def quiet() -> Progress:
    return Progress(enabled=False)


# -- state directory and credentials ------------------------------------------------------------


def test_generated_credentials_are_private_and_stable(tmp_path: Path):
    """One identity per node plus the reader; the reader's alone for the operator; all 0600."""
    state = StateDir(tmp_path / "state")
    state.create("shop")
    cluster = load_cluster_text(MINIMAL)
    first = ensure_generated_credentials(state, cluster)
    path = credentials_path(state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stored = json.loads(path.read_text())
    assert sorted(stored["nodes"]) == ["n1", "n2", "n3"]
    assert stored["nodes"]["n2"]["user"] == "marmot-n2" and stored["reader"]["user"] == "marmot-reader"
    passwords = [identity.password for identity in first.identities]
    assert len(set(passwords)) == 4 and all(len(p) >= 32 for p in passwords)
    reader_file = state.root / "secrets" / "nats-reader.json"
    assert json.loads(reader_file.read_text()) == stored["reader"]
    assert stat.S_IMODE(reader_file.stat().st_mode) == 0o600
    assert ensure_generated_credentials(state, cluster) == first  # reused, not regenerated
    path.chmod(0o644)
    reader_file.chmod(0o644)
    ensure_generated_credentials(state, cluster)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # loosened modes are tightened again
    assert stat.S_IMODE(reader_file.stat().st_mode) == 0o600
    # A node leaving the spec loses its identity (the servers then refuse it); the rest stay.
    smaller = replace(cluster, nodes=cluster.nodes[:2])
    after = ensure_generated_credentials(state, smaller)
    assert [i.node for i in after.identities] == ["n1", "n2", None]
    assert set(after.identities) <= set(first.identities)


def test_state_dir_refuses_a_foreign_directory(tmp_path: Path):
    (tmp_path / "precious.txt").write_text("not ours")
    with pytest.raises(ApplianceError, match="not created by marmot-appliance"):
        StateDir(tmp_path).create("shop")


def test_state_lock_is_exclusive(tmp_path: Path):
    state = StateDir(tmp_path / "state")
    state.create("shop")
    with state.locked():
        with pytest.raises(StateLockedError):
            with state.locked():
                pass


def test_state_round_trip_and_wrong_cluster(tmp_path: Path):
    state = StateDir(tmp_path / "state")
    state.create("shop")
    record = ProcessRecord("node/n1", "abc", 123, ["x"], 42, "/log", 1.0, {"node settings": "h"})
    state.save(RecordedState("shop", {"node/n1": record}))
    assert state.load("shop").processes == {"node/n1": record}
    with pytest.raises(ApplianceError, match="belongs to cluster 'shop'"):
        state.load("other")
    state.state_file.write_text("{not json")
    with pytest.raises(ApplianceError, match="unreadable"):
        state.load("shop")


# -- supervisor ---------------------------------------------------------------------------------


def test_supervisor_starts_recognises_and_stops_by_pid(tmp_path: Path):
    argv = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"]
    log = tmp_path / "x.log"
    record = start_process("node/x", argv, log, "hash", cwd=tmp_path)
    try:
        assert is_running(record)
        deadline = time.monotonic() + 30
        while "up" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "up" in log.read_text()  # output goes to the log
        # A record whose start time differs is a reused PID: not ours, never signalled.
        impostor = replace(record, start_ticks=record.start_ticks + 1)
        assert not is_running(impostor)
        assert stop_process(impostor) is False
        assert is_running(record)
        other_program = replace(record, argv=[*argv, "different"])
        assert not is_running(other_program)
        assert stop_process(record) is True
    finally:
        stop_process(record)  # no assertion here: it would hide the first failure
    assert not is_running(record)
    assert stop_process(record) is False  # stopping twice is harmless


def test_supervisor_kills_what_ignores_sigterm(tmp_path: Path):
    argv = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)",
    ]
    log = tmp_path / "stubborn.log"
    record = start_process("node/stubborn", argv, log, "hash", cwd=tmp_path)
    deadline = time.monotonic() + 30
    while "ready" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stop_process(record, timeout_s=0.5) is True
    assert not is_running(record)


# -- plan ---------------------------------------------------------------------------------------


CREDS = ServerCredentials(
    identities=tuple(Identity(f"marmot-n{i}", f"{i}" * 40, f"n{i}") for i in (1, 2, 3)) + (Identity("marmot-reader", "q" * 40),),
    route_user="marmot-route",
    route_password="r" * 40,
)


def _records_for(desired, running_pid: int = 1) -> RecordedState:
    """State as apply leaves it: config files written, one record per resource."""
    for resource in desired:
        if resource.config_path is not None:
            resource.config_path.parent.mkdir(parents=True, exist_ok=True)
            resource.config_path.write_text(resource.config_text)
    processes = {
        r.name: ProcessRecord(r.name, r.config_hash, running_pid, list(r.argv), 1, "/dev/null", 0.0, dict(r.facets))
        for r in desired
    }
    return RecordedState("local", processes)


def test_plan_names_only_the_node_whose_setting_changed(spec: Path):
    cluster = load_cluster(spec)
    state = state_dir_of(cluster)
    desired = desired_resources(cluster, state, spec, CREDS)
    recorded = _records_for(desired)
    alive = lambda record: True  # noqa: E731 (every recorded process counts as running here)
    assert not compute_plan("local", state.root, desired, recorded, False, alive).has_changes

    # A hand-edited nats-server config is drift: that server restarts with the rendered one.
    config = desired[0].config_path
    config.write_text(config.read_text() + "\n# local edit\n")
    drift = compute_plan("local", state.root, desired, recorded, False, alive)
    assert [(c.resource, c.reasons) for c in drift.changes] == [("nats-server/n1", ("config file modified on disk",))]
    config.write_text(desired[0].config_text)

    n3 = cluster.node("n3")
    edited = replace(
        cluster,
        nodes=tuple(
            replace(n, tables=TableSelection(exclude=("sessions",))) if n is n3 else n for n in cluster.nodes
        ),
    )
    plan = compute_plan("local", state.root, desired_resources(edited, state, spec, CREDS), recorded, False, alive)
    assert [(c.resource, c.action, c.reasons) for c in plan.changes] == [
        ("node/n3", "update", ("node settings changed",))
    ]

    replication = replace(cluster, replication=replace(cluster.replication, max_log_entries=5))
    plan = compute_plan("local", state.root, desired_resources(replication, state, spec, CREDS), recorded, False, alive)
    assert sorted(c.resource for c in plan.changes) == ["node/n1", "node/n2", "node/n3"]
    assert {c.reasons for c in plan.changes} == {("replication settings changed",)}


def test_plan_dead_processes_and_removed_nodes(spec: Path):
    cluster = load_cluster(spec)
    state = state_dir_of(cluster)
    desired = desired_resources(cluster, state, spec, CREDS)
    recorded = _records_for(desired)
    dead = {"nats-server/n2"}
    alive = lambda record: record.resource not in dead  # noqa: E731
    plan = compute_plan("local", state.root, desired, recorded, False, alive)
    assert [(c.resource, c.action, c.reasons) for c in plan.changes] == [
        ("nats-server/n2", "update", ("not running",))
    ]

    two_nodes = replace(cluster, nodes=cluster.nodes[:2])
    desired2 = desired_resources(two_nodes, state, spec, CREDS)
    alive_all = lambda record: True  # noqa: E731
    kept = compute_plan("local", state.root, desired2, recorded, False, alive_all)
    assert kept.orphans == ["node/n3", "nats-server/n3"]
    assert all(c.action != "delete" for c in kept.changes)
    assert "apply --prune" in render_plan_text(kept)
    pruned = compute_plan("local", state.root, desired2, recorded, True, alive_all)
    deletes = [c.resource for c in pruned.changes if c.action == "delete"]
    assert deletes == ["node/n3", "nats-server/n3"]  # node runtime before its server


def test_plan_output_never_contains_the_password(spec: Path):
    cluster = load_cluster(spec)
    state = state_dir_of(cluster)
    desired = desired_resources(cluster, state, spec, CREDS)
    plan = compute_plan("local", state.root, desired, RecordedState("local"), False)
    for text in (render_plan_text(plan), render_plan_json(plan), repr(plan), repr(desired)):
        assert all(identity.password not in text for identity in CREDS.identities)
        assert CREDS.route_password not in text


# -- databases ----------------------------------------------------------------------------------


def test_missing_databases_are_created_in_wal_mode(spec: Path):
    cluster = load_cluster(spec)
    created = prepare_databases(cluster)
    assert sorted(map(str, created)) == sorted(n.db for n in cluster.nodes)
    for node in cluster.nodes:
        conn = sqlite3.connect(node.db)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    assert prepare_databases(cluster) == []  # existing ones are left alone


def test_apply_refuses_a_rollback_journal_database_and_starts_nothing(spec: Path):
    cluster = load_cluster(spec)
    prepare_databases(cluster)
    victim = Path(cluster.node("n2").db)
    conn = sqlite3.connect(victim)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("INSERT INTO t VALUES (1, 'kept')")
    conn.commit()
    conn.close()
    with pytest.raises(ApplianceError, match="n2.*journal mode.*PRAGMA journal_mode=WAL"):
        apply_local(cluster, ApplyOptions(health_timeout_s=5), quiet())
    assert not state_dir_of(cluster).state_file.exists()
    assert not state_dir_of(cluster).root.exists()  # refused before anything was created
    conn = sqlite3.connect(victim)
    assert conn.execute("SELECT v FROM t").fetchall() == [("kept",)]  # untouched
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


# -- CLI edges ----------------------------------------------------------------------------------


def test_plan_cli_detailed_exitcode_and_json_without_side_effects(workdir: Path, spec: Path):
    result = run_cli(workdir, "plan", str(spec), "--output", "json", "--detailed-exitcode")
    assert result.returncode == 2, describe(result)
    data = json.loads(result.stdout)
    assert {(c["resource"], c["action"]) for c in data["changes"]} == {
        (f"{kind}/n{i}", "create") for kind in ("nats-server", "node") for i in (1, 2, 3)
    }
    assert all(c["reasons"] == ["new"] for c in data["changes"])
    assert not (workdir / ".marmot-appliance").exists()  # plan changed nothing
    text = run_cli(workdir, "plan", str(spec))
    assert text.returncode == 0, describe(text)
    assert "+ nats-server/n1" in text.stdout and "6 to create" in text.stdout


@pytest.mark.parametrize("command", ["plan", "apply", "status", "destroy"])
def test_bad_spec_paths_are_clear_errors(workdir: Path, command: str):
    result = run_cli(workdir, command, str(workdir / "missing.yaml"))
    assert result.returncode == 1, describe(result)
    assert "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_spec_is_reported_not_applied(workdir: Path):
    bad = workdir / "bad.yaml"
    bad.write_text("apiVersion: marmot-appliance/v1\nkind: Cluster\nname: x\nnodes: 3\n")
    result = run_cli(workdir, "apply", str(bad))
    assert result.returncode == 1, describe(result)
    assert "bad.yaml:" in result.stderr and "Traceback" not in result.stderr
    assert not (workdir / ".marmot-appliance").exists()


def test_bad_flag_values_exit_1(workdir: Path, spec: Path):
    for args in (("plan", str(spec), "--output", "yaml"), ("apply", str(spec), "--timeout", "-3")):
        result = run_cli(workdir, *args)
        assert result.returncode == 1, describe(result)
        assert "Traceback" not in result.stderr


def test_destroy_before_apply_is_harmless(workdir: Path, spec: Path):
    result = run_cli(workdir, "destroy", str(spec), "--purge")
    assert result.returncode == 0, describe(result)
    assert "Nothing to destroy" in result.stdout


def test_destroy_purge_refuses_a_directory_it_did_not_create(workdir: Path):
    data = spec_data()
    foreign = workdir / "precious"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    data.setdefault("deploy", {})["state_dir"] = str(foreign)
    spec = write_spec(workdir, data)
    result = run_cli(workdir, "destroy", str(spec), "--purge")
    assert result.returncode == 1, describe(result)
    assert "not created by marmot-appliance" in result.stderr
    assert (foreign / "keep.txt").read_text() == "mine"


def test_remote_status_names_each_node_state():
    """status for remote specs (run for real in tests/test_lab_deploy.py): how each state reads."""
    from marmot_appliance.deploy.remote import RemoteNodeStatus, render_remote_status

    ok = {"status": "ok", "started": True, "nats": {"connected": True}, "lag": {"s-1": 2},
          "pending_rows": 0, "dead_letters": 0, "database": {"ok": True, "error": None}, "failed_parts": {}}
    broken = {**ok, "status": "unhealthy", "failed_parts": {"publish": "RuntimeError: boom"}}
    lines = render_remote_status([
        RemoteNodeStatus("n1", True, 200, ok),
        RemoteNodeStatus("n2", True, 503, broken),
        RemoteNodeStatus("n3", True, None, None, "Connection refused"),
        RemoteNodeStatus("n4", False, None, None, "host not reached"),
        RemoteNodeStatus("n5", True, 503, {**ok, "status": "restoring",
                                           "reason": "snapshot restore running: stream s-1: entries 3..9 are gone"}),
    ]).splitlines()
    assert lines[0].split()[:3] == ["NODE", "STATE", "NATS"]
    assert lines[1].split()[:6] == ["n1", "healthy", "yes", "2", "0", "0"]
    assert lines[2].split()[:2] == ["n2", "unhealthy"] and "publish: RuntimeError: boom" in lines[2]
    assert lines[3].split()[:2] == ["n3", "down"] and "Connection refused" in lines[3]
    assert lines[4].split()[:2] == ["n4", "unreachable"]
    assert lines[5].split()[:2] == ["n5", "restoring"] and "snapshot restore running: stream s-1" in lines[5]
    assert [RemoteNodeStatus("n", True, 200, ok).healthy, RemoteNodeStatus("n", True, 503, broken).healthy] == [True, False]


def test_status_before_apply_reports_unhealthy(workdir: Path, spec: Path):
    result = run_cli(workdir, "status", str(spec), "--output", "json")
    assert result.returncode == 1, describe(result)
    data = json.loads(result.stdout)
    assert data["healthy"] is False
    assert [n["node"] for n in data["nodes"]] == ["n1", "n2", "n3"]
    assert all("node runtime not running" in n["problems"] for n in data["nodes"])


# -- progress -----------------------------------------------------------------------------------


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_progress_is_quiet_off_a_terminal_and_results_always_print():
    out, status = _Stream(False), _Stream(False)
    progress = Progress(out=out, status=status)
    progress.waiting("waiting for node/n1")
    progress.say("started node/n1 (pid 1)")
    assert status.text == ""
    assert out.text == "started node/n1 (pid 1)\n"

    out, status = _Stream(False), _Stream(True)
    progress = Progress(out=out, status=status)
    progress.waiting("waiting for node/n1")
    assert "waiting for node/n1" in status.text
    progress.say("done")
    assert status.text.endswith("\r\033[K")  # the spinner line is cleared before output
    assert out.text == "done\n"
