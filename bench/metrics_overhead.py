"""What the metrics cost the replication hot path, as ratios measured in one run.

    .venv/bin/python bench/metrics_overhead.py [--rows 40000] [--phases 6] [--calibrate]

Four node runtimes on one 3-server JetStream cluster (R3, one shard), as real processes:
n1 and n3 with metrics, n2 and n4 with the metrics' hot-path work switched off
(bench/metrics_off_node.py). In each phase n1 and n2 both commit `--rows` rows (100-row
transactions, two writer threads, at the same time) and the phase ends when every node holds
all of them; every node's CPU (utime+stime from /proc) is taken for the phase. So each pair
does the very same work under the very same load at the same time:

- origins: n1 against n2, each publishing its own rows and applying the other's;
- receivers: n3 against n4, each applying both.

Ratio = CPU with metrics / CPU without, per phase; the median over the phases is the figure.
Before the phases, the exact metrics calls the hot path makes are timed in this process (per
applied message on a receiver, per publish round on an origin), with no noise from the other
processes: the cost per row they add is that figure divided by the rows per message.
`--calibrate` runs all four nodes with metrics: the ratios then show what identical nodes
differ by on this machine at this moment (the noise floor). Same cautions as
bench/replication.py: 127.0.0.1 only, bounded in rows and seconds, every process stopped by pid.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from replication import (  # noqa: E402  (bench/replication.py)
    ROOT,
    SYNCHRONOUS,
    count_rows,
    cpu_per_row,
    cpu_snapshot,
    make_db,
    row,
    start_node,
    stop_nodes,
    wait_health,
)

from tests.harness import NatsCluster, free_ports  # noqa: E402

OFF = ("bench/metrics_off_node.py",)
ON = ("-m", "marmot_appliance")
NODES = (1, 2, 3, 4)
PAIRS = {"origins": (1, 2), "receivers": (3, 4)}  # (with metrics, without)
PHASE_TIMEOUT_S = 180.0


def _write(db: Path, rows: int, prefix: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        conn.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
        for base in range(0, rows, 100):
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?)", [row(base + k, prefix) for k in range(100)])
            conn.execute("COMMIT")
    finally:
        conn.close()


def phase(dbs: dict[int, Path], rows: int, prefix: str, pids: dict[int, int]) -> dict[int, float]:
    """n1 and n2 each commit `rows` at once; CPU µs per committed row of every node until all
    four hold all of them."""
    groups = {str(node): [pid] for node, pid in pids.items()}
    before = cpu_snapshot(groups)
    writers = [threading.Thread(target=_write, args=(dbs[node], rows, f"{prefix}{node}-")) for node in PAIRS["origins"]]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(PHASE_TIMEOUT_S)
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    where = f"WHERE id LIKE '{prefix}%'"
    while any(count_rows(db, where) < 2 * rows for db in dbs.values()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"phase {prefix} did not complete in {PHASE_TIMEOUT_S:.0f}s")
        time.sleep(0.01)
    cpu = cpu_per_row(before, cpu_snapshot(groups), 2 * rows)
    return {int(node): values[0] for node, values in cpu.items()}


def time_hot_path_calls(repeat: int = 20_000) -> tuple[float, float]:
    """µs of the metrics calls per applied message (consumer) and per one-message publish round
    (publisher, the ack timer's done-callback included), best of 5, in this process. CPU time
    (time.process_time), so the wait for a core on a loaded machine does not count."""
    import asyncio
    import timeit

    from marmot_appliance.observability.ack_timer import RoundAckTimer
    from marmot_appliance.observability.metrics import Metrics

    metrics = Metrics()

    def applied_message() -> None:  # replication/consumer_messages.py: handle_group + _apply_timed + _after_apply
        metrics.observe("apply_transaction_seconds", 0.0012)
        metrics.observe("commit_to_visible_seconds", 0.004)
        metrics.inc("rows_applied", 100)
        metrics.inc("batches_applied", 1)
        metrics.set("stream_lag", 0, stream="marmot-changes-1")

    async def rounds(timed: bool) -> float:
        loop = asyncio.get_running_loop()
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for _ in range(repeat):
                future = loop.create_future()
                if timed:  # sending.send_batches (the timer) + publisher._collect_acks (the counters)
                    RoundAckTimer(metrics, time.monotonic(), [future])
                    for name in ("rows_published", "batches_published", "bytes_compressed", "bytes_uncompressed"):
                        metrics.inc(name, 100)
                future.set_result(None)
                await asyncio.sleep(0)  # the ack's callbacks run
            best = min(best, time.process_time() - start)
        return best / repeat * 1e6

    consumer = min(timeit.repeat(applied_message, timer=time.process_time, number=repeat, repeat=5)) / repeat * 1e6
    publisher = asyncio.run(rounds(True)) - asyncio.run(rounds(False))
    return consumer, publisher


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000, help="rows per writer and phase")
    parser.add_argument("--phases", type=int, default=6)
    parser.add_argument("--calibrate", action="store_true", help="all four nodes with metrics: the noise floor")
    args = parser.parse_args()
    if args.phases < 1 or args.rows < 100:
        parser.error("--phases must be 1 or more and --rows 100 or more")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    per_message, per_round = time_hot_path_calls()
    print(f"# metrics calls timed in-process: {per_message:.2f} us per applied message (receiver),"
          f" {per_round:.2f} us per publish round (origin)")
    programs = {node: ON if args.calibrate or node in (1, 3) else OFF for node in NODES}
    scratch = ROOT / ".marmot-appliance" / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="metrics-", dir=scratch))
    (tmp / "nats").mkdir()
    cluster = NatsCluster(root=tmp / "nats")
    procs: dict[int, subprocess.Popen] = {}
    try:
        cluster.start(3)
        dbs = {node: make_db(tmp / f"node{node}.db") for node in NODES}
        ports = dict(zip(NODES, free_ports(len(NODES))))
        for node in NODES:
            procs[node] = start_node(node, dbs[node], cluster.url, ports[node], tmp / f"node{node}.log", programs[node])
        for port in ports.values():
            wait_health(port)
        pids = {node: proc.pid for node, proc in procs.items()}
        kinds = ", ".join(f"n{node} {'on' if programs[node] == ON else 'off'}" for node in NODES)
        print(f"# metrics overhead ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {kinds}):"
              f" n1 and n2 each write {args.rows} rows per phase in 100-row txns, R3")
        print("  phase   CPU us/row:  n1      n2      n3      n4    origins n1/n2  receivers n3/n4")
        ratios: dict[str, list[float]] = {name: [] for name in PAIRS}
        receiver_cpu: list[float] = []  # n3's µs/row per phase (its messages carry 100 rows)
        for number in range(args.phases):
            cpu = phase(dbs, args.rows, f"p{number}-", pids)
            for name, (on, off) in PAIRS.items():
                ratios[name].append(cpu[on] / cpu[off])
            receiver_cpu.append(cpu[PAIRS["receivers"][0]])
            print(f"  {number + 1:>5}        " + "  ".join(f"{cpu[n]:6.1f}" for n in NODES)
                  + f"    {ratios['origins'][-1]:10.3f}  {ratios['receivers'][-1]:15.3f}")
        print()
        receiver = statistics.median(receiver_cpu)
        print(f"  in-process: {per_message / 100:.3f} us/row for the receiver's metrics calls at 100 rows per message"
              f" = {per_message / 100 / receiver * 100:.2f}% of a receiver's {receiver:.1f} us/row here")
        for name, values in ratios.items():
            print(f"  {name}: with / without metrics = {statistics.median(values):.3f}"
                  f" (median of {len(values)} phases, range {min(values):.3f} - {max(values):.3f})")
    finally:
        stop_nodes(list(procs.values()))
        cluster.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
