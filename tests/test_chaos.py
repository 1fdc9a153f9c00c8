"""The chaos harness (bench/chaos.py): short runs on real processes, and proof that it can fail.

Each harness run starts 3 nats-servers, 3 `marmot-appliance node` processes and 3 writer
processes on 127.0.0.1, injects faults drawn from a seed, heals, and checks the oracle
(docs/reliability.md, "The chaos harness"). The long campaign is recorded in that document; CI
runs a few short seeds.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from bench import chaos_oracle as oracle
from bench.chaos_workload import PRIMARY_KEYS, create_database, initial_rows

ROOT = Path(__file__).resolve().parent.parent


def run_harness(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--work-dir", str(tmp_path / "work"),
                           "--json", str(tmp_path / "runs.jsonl"), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def test_short_chaos_runs_converge(tmp_path):
    """Two 15-second runs with every default fault kind and a shifted clock: the oracle passes."""
    result = run_harness(tmp_path, "--runs", "2", "--seed", "4100", "--duration", "15")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "2/2 runs passed" in result.stdout
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in runs] == [4100, 4101]
    assert all(r["ok"] and r["transactions"] > 0 and r["faults"] for r in runs), runs
    assert "Traceback" not in result.stderr


def test_a_divergence_fails_the_run_keeps_its_directory_and_prints_the_replay(tmp_path):
    """The harness's failure path, end to end: a replica's row changed with capture bypassed is
    found by the oracle and by `verify`, and `repair` makes the files equal again."""
    result = run_harness(tmp_path, "--runs", "1", "--seed", "4200", "--duration", "6", "--faults", "node-pause",
                         "--no-clock-shift", "--self-test-divergence", "--repair")
    assert result.returncode == 1, result.stdout[-6000:] + result.stderr[-3000:]
    assert "files differ: table accounts: 1 keys differ" in result.stdout
    assert "rows no writer wrote: 1" in result.stdout
    assert "verify exit 1: accounts diverged (1 keys: [0] same version, different rows)" in result.stdout
    assert "repair: exit 0, files equal afterwards" in result.stdout  # detected, repaired, verified
    assert "replay: " in result.stdout and "--seed 4200" in result.stdout and "--self-test-divergence" in result.stdout
    assert (tmp_path / "work" / "run-4200" / "node3.db").exists()  # kept for the post-mortem


def _history_log(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_oracle_names_lost_invented_and_stale_rows(tmp_path):
    """Each oracle check fails on a real SQLite file that breaks exactly its rule."""
    db = create_database(tmp_path / "node.db")
    log = _history_log(tmp_path / "ops-1.jsonl", [
        {"writer": 1, "txn": 1, "ops": [{"op": "upsert", "table": "items", "key": ["n1-1"],
                                         "row": ["n1-1", "new", 1, "1:1:0"]}]},
        {"writer": 1, "txn": 2, "ops": [{"op": "upsert", "table": "items", "key": ["n1-2"],
                                         "row": ["n1-2", "new", 2, "1:2:0"]}]},
        {"writer": 1, "txn": 3, "ops": [{"op": "upsert", "table": "items", "key": ["n1-2"],
                                         "row": ["n1-2", "updated", 3, "1:3:0"]}]},
        {"writer": 1, "txn": 4, "ops": [{"op": "upsert", "table": "items", "key": ["n1-3"],
                                         "row": ["n1-3", "new", 4, "1:4:0"]},
                                        {"op": "delete", "table": "items", "key": ["n1-3"]}]},
    ])
    history = oracle.load_history([log], initial_rows(), PRIMARY_KEYS)
    conn = sqlite3.connect(db)
    with conn:
        # n1-1 lost; n1-2 stale (an older image of its only writer); n1-3 deleted and still gone
        conn.execute("INSERT INTO items VALUES ('n1-2', 'new', 2, '1:2:0')")
        conn.execute("UPDATE accounts SET balance = 1 WHERE id = 3")  # a value no writer wrote
    conn.close()
    problems = oracle.check_history(db, history, PRIMARY_KEYS)
    assert any(p.startswith("acknowledged writes missing (never deleted): 1") and "n1-1" in p for p in problems)
    assert any(p.startswith("rows no writer wrote: 1") and "(3, 'owner-3', 1, 'initial')" in p for p in problems)
    assert any(p.startswith("single-writer keys not at their writer's last value: 2") for p in problems), problems

    conn = sqlite3.connect(db)
    with conn:
        conn.execute("INSERT INTO items VALUES ('n1-1', 'new', 1, '1:1:0')")
        conn.execute("UPDATE items SET val = 'updated', n = 3, token = '1:3:0' WHERE id = 'n1-2'")
        conn.execute("UPDATE accounts SET balance = 1000 WHERE id = 3")
    conn.close()
    assert oracle.check_history(db, history, PRIMARY_KEYS) == []

    other = create_database(tmp_path / "other.db")
    assert oracle.check_files_equal({1: db, 2: other}, PRIMARY_KEYS) == [
        "files differ: table items: 2 keys differ, e.g. ('n1-1',): node 1=('n1-1', 'new', 1, '1:1:0'), node 2=None; "
        "('n1-2',): node 1=('n1-2', 'updated', 3, '1:3:0'), node 2=None"]


def test_dead_letters_other_than_injected_poison_are_reported(tmp_path):
    from marmot_appliance.replication.types import DEAD_LETTER_TABLE

    db = create_database(tmp_path / "node.db")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(f'CREATE TABLE "{DEAD_LETTER_TABLE}" (id INTEGER PRIMARY KEY, stream TEXT, seq INTEGER, '
                     "reason TEXT NOT NULL, payload BLOB, received_at REAL NOT NULL)")
        conn.execute(f'INSERT INTO "{DEAD_LETTER_TABLE}" (stream, seq, reason, payload, received_at) '
                     "VALUES ('s', 1, 'poison', ?, 0)", (b"injected",))
    conn.close()
    assert oracle.check_bookkeeping({1: db}, [b"injected"]) == []
    assert oracle.check_bookkeeping({1: db}, []) == [
        "node 1: 1 dead letters that are not injected poison, e.g. b'injected'"]


def test_summarize_totals_a_campaign(tmp_path):
    from bench.chaos import summarize

    runs = tmp_path / "runs.jsonl"
    common = {"duration_s": 20.0, "transactions": 10, "operations": 30, "wall_s": 60.0, "repair": "not run"}
    runs.write_text(
        json.dumps({**common, "seed": 7, "plan": "seed 7, node 1 clock +9s, faults: poison,log-roll", "ok": True,
                    "faults": ["t+  2.0s poison shard 1 for 0.0s: published",
                               "t+  4.0s node-kill9 node 2 for 1.0s: healed"],
                    "problems": [], "converge_s": 1.5, "verify": "converged"}) + "\n"
        + json.dumps({**common, "seed": 8, "plan": "seed 8, no clock shift, faults: poison", "ok": False,
                      "faults": ["t+  2.0s poison shard 3 for 0.0s: published"],
                      "problems": ["files differ: table items"], "converge_s": None, "verify": "diverged"}) + "\n")
    text = summarize([runs])
    assert "runs: 2, passed: 1, failed: 1" in text
    assert "faults: 3 (node-kill9 1, poison 2)" in text
    assert "runs with log-roll: 1; with a shifted clock: 1" in text
    assert "verify: converged 1, diverged 1" in text
    assert "FAILED seed 8: files differ: table items" in text


def test_oracle_knows_which_write_must_win(tmp_path):
    """Two writers wrote the same key: the copy must hold the image of the larger (version, origin),
    even where the older image is also "a value some writer wrote"."""
    db = create_database(tmp_path / "node.db")
    older = {"op": "upsert", "table": "items", "key": ["c1"], "row": ["c1", "from 2", 0, "2:5:0"], "version": 900}
    newer = {"op": "upsert", "table": "items", "key": ["c1"], "row": ["c1", "from 1", 0, "1:3:0"], "version": 901}
    tie = {"op": "delete", "table": "items", "key": ["c1"], "version": 901}  # same version, larger origin: wins
    logs = [_history_log(tmp_path / "ops-1.jsonl", [{"writer": 1, "txn": 3, "ops": [newer]}]),
            _history_log(tmp_path / "ops-2.jsonl", [{"writer": 2, "txn": 5, "ops": [older]}])]
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("INSERT INTO items VALUES ('c1', 'from 2', 0, '2:5:0')")
    conn.close()
    problems = oracle.check_history(db, oracle.load_history(logs, initial_rows(), PRIMARY_KEYS), PRIMARY_KEYS)
    assert problems == ["keys not at their newest write (last-writer-wins by (version, origin)): 1, e.g. items "
                        "('c1',): newest write (901, node 1) left ('c1', 'from 1', 0, '1:3:0'), "
                        "found ('c1', 'from 2', 0, '2:5:0')"]
    logs.append(_history_log(tmp_path / "ops-3.jsonl", [{"writer": 3, "txn": 1, "ops": [tie]}]))
    problems = oracle.check_history(db, oracle.load_history(logs, initial_rows(), PRIMARY_KEYS), PRIMARY_KEYS)
    assert any("newest write (901, node 3) left None" in p for p in problems), problems
