"""`marmot-appliance snapshot save|list|restore` as a user runs it: real processes, real NATS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.snapshot_support import SCHEMA, fill, positions_of, user_digests

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "marmot_appliance", "snapshot", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def test_save_list_restore_from_seed_flags(nats_cluster, wal_db):
    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    fill(source, 0, 2000, positions={"marmot-changes-1": 12})
    url = nats_cluster.url

    saved = cli("save", "--nats-url", url, "--db-path", str(source), "--node-id", "1")
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.startswith("saved snapshot-00000001-node-1-")
    assert "Traceback" not in saved.stderr

    again = cli("save", "--nats-url", url, "--db-path", str(source), "--node-id", "1")
    assert again.returncode == 0 and "already reflects" in again.stdout

    listed = cli("list", "--nats-url", url, "--output", "json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert len(entries) == 1 and entries[0]["positions"] == {"marmot-changes-1": 12}
    text = cli("list", "--nats-url", url)
    assert entries[0]["name"] in text.stdout and "marmot-changes-1=12" in text.stdout

    restored = cli("restore", "--nats-url", url, "--db-path", str(target), "--node-id", "2")
    assert restored.returncode == 0, restored.stderr
    assert user_digests(target)["items"] == user_digests(source)["items"]
    assert positions_of(target)["marmot-changes-1"] == 12


def test_bad_input_is_one_message_and_exit_1(nats_cluster, tmp_path):
    url = nats_cluster.url
    cases = [
        ("save",),  # no target at all
        ("save", "--nats-url", url),  # no database
        ("save", "--nats-url", url, "--db-path", str(tmp_path / "missing.db")),
        ("save", "--spec", str(tmp_path / "missing.yaml"), "--node", "n1"),
        ("restore", "--nats-url", url, "--db-path", str(tmp_path / "x.db"), "--name", "nope"),
        ("list", "--nats-url", "nats://127.0.0.1:1"),
        ("save", "--nats-url", url, "--db-path", "x.db", "--node-id", "zero"),
    ]
    for args in cases:
        result = cli(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert result.stderr.strip(), args


def test_list_with_no_snapshots(nats_cluster):
    result = cli("list", "--nats-url", nats_cluster.url)
    assert result.returncode == 0
    assert "no snapshots" in result.stdout
