"""Every CLI command that talks to NATS fails the same clear way when it cannot connect.

Real nats-server (with a user and password), the real CLI as a subprocess: a closed port and
wrong credentials each give one message naming the servers and the cause, a non-zero exit
(2 for verify / repair, whose 1 means "diverged"), and no traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import NatsCluster, free_ports, make_wal_db

REPO = Path(__file__).resolve().parent.parent

# (argv after the URL flag, the exit code a connection failure gives)
COMMANDS = {
    "snapshot list": (["snapshot", "list"], [], 1),
    "snapshot save": (["snapshot", "save"], ["--db-path", "{db}"], 1),
    "snapshot restore": (["snapshot", "restore"], ["--db-path", "{db}"], 1),
    "verify": (["verify"], [], 2),
    "repair": (["repair"], [], 2),
    "watch": (["watch"], [], 1),
}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    cluster = NatsCluster(root=tmp_path_factory.mktemp("nats-auth"))
    try:
        yield cluster.start(1, user="operator", password="right-password")
    finally:
        cluster.stop()


def run(command: str, url: str, db: Path) -> subprocess.CompletedProcess:
    head, tail, _code = COMMANDS[command]
    argv = [*head, "--nats-url", url, *(arg.format(db=db) for arg in tail)]
    return subprocess.run([sys.executable, "-m", "marmot_appliance", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_closed_port_is_one_clear_message(command, tmp_path):
    db = make_wal_db(tmp_path / "n.db", "CREATE TABLE t (k PRIMARY KEY)")
    url = f"nats://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    result = run(command, url, db)
    assert result.returncode == COMMANDS[command][2], (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert f"error: cannot connect to NATS at {url}: " in result.stderr, result.stderr
    assert "refused" in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_wrong_credentials_are_one_clear_message(command, auth_server, tmp_path):
    db = make_wal_db(tmp_path / "n.db", "CREATE TABLE t (k PRIMARY KEY)")
    port = auth_server.configs[0].client_port
    result = run(command, f"nats://operator:wrong-password@127.0.0.1:{port}", db)
    assert result.returncode == COMMANDS[command][2], (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert f"error: cannot connect to NATS at nats://127.0.0.1:{port}: " in result.stderr, result.stderr
    assert "authorization violation" in result.stderr.lower(), result.stderr
    assert "wrong-password" not in result.stderr  # a secret in a URL is never printed


def test_a_command_tries_every_server_not_only_the_first(auth_server, tmp_path):
    """Before, a command gave up after the first server it tried (allow_reconnect=False): with
    one server of the list down, `snapshot list` failed about as often as that server came first."""
    port = auth_server.configs[0].client_port
    dead = [f"nats://127.0.0.1:{p}" for p in free_ports(3)]
    live = f"nats://operator:right-password@127.0.0.1:{port}"
    for _ in range(3):
        result = run("snapshot list", ",".join([*dead, live]), tmp_path / "unused.db")
        assert result.returncode == 0, result.stderr
        assert "no snapshots in bucket" in result.stdout
