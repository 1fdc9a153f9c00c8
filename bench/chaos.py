"""Chaos harness: random faults under writes on every node, then a convergence oracle.

    .venv/bin/python bench/chaos.py --runs 5 --seed 100 --duration 30

Each run starts a fresh local cluster (3 JetStream servers, 3 `marmot-appliance node` processes
run from one cluster spec, or from the seed's flags with --flag-mode, with `shards: 4` and
snapshots on) and a writer on every node, and injects faults drawn from the
run's seed for --duration seconds: kill -9 and SIGSTOP of node runtimes and of nats-servers (one,
two or all three at once), graceful restarts, long stops, forced snapshot restores, poison
messages, a small `max_log_entries` so the log rolls past stopped nodes (log-roll), and one node
with its writer on a shifted wall clock. Then it heals everything, waits for quiescence and
checks the oracle (bench/chaos_oracle.py, and `marmot-appliance verify` when this build has it).
Run i uses seed S+i. A failing run keeps its work directory and prints the command that replays
its seed; the exit status is 1 if any run failed. docs/reliability.md describes the harness and
records long runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import chaos_oracle as oracle  # noqa: E402
from bench.chaos_cluster import LIBFAKETIME, LocalCluster, NodeSettings  # noqa: E402
from bench.chaos_faults import ALL_KINDS, EVENT_KINDS, KNOWN_FAILING, FaultInjector  # noqa: E402
from bench.chaos_workload import PRIMARY_KEYS, create_database, initial_rows  # noqa: E402
from marmot_appliance.replication.bookkeeping import MARKER_TABLE  # noqa: E402
from marmot_appliance.replication.sqlite_util import quote_ident  # noqa: E402

HEAL_TIMEOUT_S = 120.0
# The harness's self-test: a value no writer wrote, put into one replica with capture bypassed.
INJECTED_TOKEN = "injected by --self-test-divergence"
LARGE_LOG = 100_000  # max_log_entries without the log-roll fault: nothing rolls within a run
MAX_CLOCK_SHIFT_S = 40.0  # below replication.max_clock_skew_s (60 s): rows are not held


@dataclass
class RunPlan:
    """Everything drawn from the run's seed before the run starts."""

    seed: int
    duration_s: float
    kinds: list[str]
    max_log_entries: int
    clock_shift: tuple[int, float] | None  # (node id, seconds) or None

    def describe(self) -> str:
        shift = f"node {self.clock_shift[0]} clock {self.clock_shift[1]:+.0f}s" if self.clock_shift else "no clock shift"
        return (f"seed {self.seed}, {self.duration_s:.0f}s, shards 4, max_log_entries {self.max_log_entries}, "
                f"{shift}, faults: {','.join(self.kinds)}")


@dataclass
class RunResult:
    plan: RunPlan
    problems: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    transactions: int = 0
    operations: int = 0
    verify: str = "not run"
    repair: str = "not run"
    converge_s: float | None = None
    wall_s: float = 0.0
    work: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def plan_run(seed: int, duration_s: float, kinds: list[str], clock_shift: bool) -> RunPlan:
    rng = random.Random(f"plan-{seed}")
    shift = None
    if clock_shift:
        shift = (rng.randrange(1, 4), rng.choice((-1, 1)) * rng.uniform(5.0, MAX_CLOCK_SHIFT_S))
    small_log = rng.choice((120, 200, 300))
    return RunPlan(seed, duration_s, kinds, small_log if "log-roll" in kinds else LARGE_LOG, shift)


def verify_available() -> bool:
    result = subprocess.run([sys.executable, "-m", "marmot_appliance", "verify", "--help"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    return result.returncode == 0


def run_verify(cluster: LocalCluster) -> tuple[int, str]:
    """`marmot-appliance verify --nats-url ... --output json`: 0 converged, 1 diverged, 2 undecided."""
    argv = [sys.executable, "-m", "marmot_appliance", "verify", "--nats-url", cluster.nats_url, "--expect-nodes",
            str(len(cluster.nodes)), "--timeout", "120", "--output", "json"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return 2, "verify did not finish in 180 s"
    return result.returncode, summarize_verify(result.stdout) or (result.stdout.strip() or result.stderr.strip())[-2000:]


def run_repair(cluster: LocalCluster, dbs: dict[int, Path]) -> str:
    """`marmot-appliance repair`, then the independent check again: did the files become equal?"""
    argv = [sys.executable, "-m", "marmot_appliance", "repair", "--nats-url", cluster.nats_url, "--expect-nodes",
            str(len(cluster.nodes)), "--timeout", "120", "--output", "json"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "repair did not finish in 240 s"
    converged = wait_quiescent(cluster, 60) is not None and not oracle.check_files_equal(dbs, PRIMARY_KEYS)
    return f"exit {result.returncode}, files {'equal' if converged else 'still differ'} afterwards"


def summarize_verify(output: str) -> str | None:
    """One line per table verify did not call converged, with a few keys and why."""
    try:
        tables = json.loads(output)["tables"]
    except (ValueError, KeyError, TypeError):
        return None
    lines = []
    for table in tables:
        if table.get("status") == "converged":
            continue
        keys = "; ".join(f"{k.get('key')!r} {k.get('reason', '')}" for k in table.get("keys", [])[:oracle.SAMPLES])
        lines.append(f"{table.get('table')} {table.get('status')} ({table.get('differing_keys')} keys: {keys}) "
                     f"{table.get('detail') or ''}".strip())
    return " | ".join(lines) or "no table reported as differing"


def wait_quiescent(cluster: LocalCluster, timeout_s: float) -> float | None:
    """Seconds until every node holds the same digests, twice in a row 1 s apart; None on timeout."""
    dbs = {node.node_id: node.db for node in cluster.nodes}
    start = time.monotonic()
    previous = None
    while time.monotonic() - start < timeout_s:
        try:
            digests = oracle.digests(dbs, list(PRIMARY_KEYS))
        except Exception:  # noqa: BLE001 - a restore may be replacing a file right now
            digests = None
        if digests and not oracle.differing_tables(digests):
            if digests == previous:
                return time.monotonic() - start
            previous = digests
        else:
            previous = None
        time.sleep(1.0)
    return None


async def _inject(cluster: LocalCluster, plan: RunPlan) -> FaultInjector:
    events = [k for k in plan.kinds if k in EVENT_KINDS]
    injector = FaultInjector(cluster, random.Random(f"faults-{plan.seed}"), events)
    if not events:
        await asyncio.sleep(plan.duration_s)
        return injector
    try:
        await injector.run(plan.duration_s)
    finally:
        cluster.aborting.set()  # a cancelled fault's wait for its node ends now
        await asyncio.sleep(0.5)
        cluster.aborting.clear()
    return injector


def inject_divergence(db: Path) -> None:
    """Change one row in a replica's file the way the applier writes (apply marker set), so no
    trigger captures it and nothing replicates it: a divergence the oracle and verify must find."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"INSERT OR IGNORE INTO {quote_ident(MARKER_TABLE)} (id) VALUES (1)")
        conn.execute("UPDATE accounts SET token = ? WHERE id = 0", (INJECTED_TOKEN,))
        conn.execute(f"DELETE FROM {quote_ident(MARKER_TABLE)}")
        conn.execute("COMMIT")
    finally:
        conn.close()


def run_once(plan: RunPlan, work: Path, rate: float, with_verify: bool, self_test: bool = False,
             with_repair: bool = False, spec_mode: bool = True) -> RunResult:
    result = RunResult(plan, work=work)
    started = time.monotonic()
    shifts = {plan.clock_shift[0]: plan.clock_shift[1]} if plan.clock_shift else {}
    cluster = LocalCluster(work, settings=NodeSettings(max_log_entries=plan.max_log_entries, spec_mode=spec_mode),
                           clock_shifts=shifts)
    try:
        cluster.start_nats()
        cluster.add_nodes(create_database)
        for node in cluster.nodes:
            cluster.start_node(node)
        for node in cluster.nodes:
            why = cluster.wait_healthy(node, HEAL_TIMEOUT_S)
            if why:
                result.problems.append(f"start: {why}")
                return result
        cluster.start_writers(plan.seed, rate)
        injector = asyncio.run(_inject(cluster, plan))
        result.faults = [str(r) for r in injector.records]
        result.problems += [f"during faults: {f}" for f in injector.findings]
        result.problems += cluster.heal(HEAL_TIMEOUT_S)
        result.problems += cluster.stop_writers()
        result.converge_s = wait_quiescent(cluster, HEAL_TIMEOUT_S)
        if self_test:
            inject_divergence(cluster.nodes[-1].db)
        dbs = {node.node_id: node.db for node in cluster.nodes}
        history = oracle.load_history([cluster.writer_log(n.node_id) for n in cluster.nodes], initial_rows(),
                                      PRIMARY_KEYS)
        result.transactions, result.operations = history.transactions, history.operations
        if result.converge_s is None:
            result.problems.append(f"not converged {HEAL_TIMEOUT_S:.0f}s after healing")
        differing = oracle.check_files_equal(dbs, PRIMARY_KEYS)
        result.problems += differing
        for node_id, db in dbs.items() if differing else list(dbs.items())[:1]:  # equal files: one speaks for all
            result.problems += [f"node {node_id}: {p}" for p in oracle.check_history(db, history, PRIMARY_KEYS)]
        result.problems += oracle.check_bookkeeping(dbs, injector.poison)
        if with_verify:
            code, output = run_verify(cluster)
            result.verify = {0: "converged", 1: "diverged", 2: "undecided"}.get(code, f"exit {code}")
            if code != 0:
                result.problems.append(f"verify exit {code}: {output}")
        if with_repair and result.problems:
            result.repair = run_repair(cluster, dbs)
        for node in cluster.nodes:
            health = node.health()
            if not health or health[0] != 200:
                result.problems.append(f"node {node.node_id} unhealthy at the end: {health}")
        return result
    except Exception as exc:  # noqa: BLE001 - a harness error fails the run with its reason, never a traceback
        result.problems.append(f"harness error: {type(exc).__name__}: {exc}")
        return result
    finally:
        cluster.teardown()
        result.wall_s = time.monotonic() - started


def replay_command(args: argparse.Namespace, seed: int) -> str:
    parts = [sys.executable, "bench/chaos.py", "--runs", "1", "--seed", str(seed), "--duration", f"{args.duration:g}"]
    if args.faults:
        parts += ["--faults", args.faults]
    if args.no_clock_shift:
        parts.append("--no-clock-shift")
    if args.flag_mode:
        parts.append("--flag-mode")
    if args.rate != 20.0:
        parts += ["--rate", f"{args.rate:g}"]
    if args.self_test_divergence:
        parts.append("--self-test-divergence")
    if args.repair:
        parts.append("--repair")
    return " ".join(parts)


def parse_kinds(text: str | None) -> list[str]:
    if not text:
        return [k for k in ALL_KINDS if k not in KNOWN_FAILING]
    if text == "all":
        return list(ALL_KINDS)
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown or not kinds:
        raise SystemExit(f"error: unknown fault kind(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(ALL_KINDS)}")
    return kinds


def summarize(paths: list[Path]) -> str:
    """A campaign's totals from --json files: runs, outcomes, faults by kind, seeds that failed."""
    runs = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    if not runs:
        return "no runs recorded"
    kinds: dict[str, int] = {}
    for run in runs:
        for fault in run["faults"]:
            kind = fault.split()[2]  # "t+  2.1s KIND TARGET ..."
            kinds[kind] = kinds.get(kind, 0) + 1
    failed = [r for r in runs if not r["ok"]]
    converge = sorted(r["converge_s"] for r in runs if r["converge_s"] is not None)
    lines = [
        f"runs: {len(runs)}, passed: {len(runs) - len(failed)}, failed: {len(failed)}",
        f"seeds: {min(r['seed'] for r in runs)}..{max(r['seed'] for r in runs)}; "
        f"durations: {', '.join(sorted({format(r['duration_s'], 'g') + 's' for r in runs}))}; "
        f"wall: {sum(r['wall_s'] for r in runs) / 60:.0f} min",
        f"transactions: {sum(r['transactions'] for r in runs)}, row operations: {sum(r['operations'] for r in runs)}",
        f"faults: {sum(kinds.values())} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})",
        f"runs with log-roll: {sum('log-roll' in r['plan'] for r in runs)}; with a shifted clock: "
        f"{sum('clock' in r['plan'] and 'no clock shift' not in r['plan'] for r in runs)}",
        f"verify: {', '.join(f'{v} {n}' for v, n in sorted(_count(r['verify'] for r in runs).items()))}",
    ]
    if converge:
        lines.append(f"quiet after healing: median {converge[len(converge) // 2]:.1f}s, max {converge[-1]:.1f}s")
    for run in failed:
        lines.append(f"FAILED seed {run['seed']}: " + " | ".join(p[:300] for p in run["problems"][:3]))
    return "\n".join(lines)


def runs_table(paths: list[Path]) -> str:
    """One Markdown row per run (for docs/reliability.md): seed, settings, faults, outcome."""
    runs = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    lines = ["| seed | s | settings | faults | txns | outcome |", "|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: r["seed"]):
        settings = run["plan"].split(", faults:")[0].split(", ", 2)[-1].replace("shards 4, ", "")
        kinds = _count(fault.split()[2] for fault in run["faults"])
        faults = ", ".join(f"{k} {n}" if n > 1 else k for k, n in sorted(kinds.items()))
        outcome = "pass" if run["ok"] else "FAIL: " + run["problems"][0][:120].replace("|", "/")
        lines.append(f"| {run['seed']} | {run['duration_s']:g} | {settings} | {faults} | {run['transactions']} | "
                     f"{outcome} |")
    return "\n".join(lines)


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Randomized fault runs against a local cluster, then an oracle.")
    parser.add_argument("--runs", type=int, default=1, help="number of runs (run i uses seed S+i)")
    parser.add_argument("--seed", type=int, default=None, help="first run's seed (default: random, printed)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of faults and writes per run")
    parser.add_argument("--rate", type=float, default=20.0, help="transactions per second per writer (bound)")
    parser.add_argument("--faults", help=f"comma-separated fault kinds, or 'all' (default: all but the known-failing "
                        f"{','.join(KNOWN_FAILING) or '(none)'}; kinds: {','.join(ALL_KINDS)})")
    parser.add_argument("--no-clock-shift", action="store_true", help="no node runs with a shifted clock")
    parser.add_argument("--flag-mode", action="store_true",
                        help="run the nodes from the seed's flags instead of a cluster spec (no node list: no "
                             "tombstone collection, gaps no snapshot closes wait for an operator)")
    parser.add_argument("--no-verify", action="store_true", help="skip `marmot-appliance verify` in the oracle")
    parser.add_argument("--work-dir", type=Path, help="where run directories go (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep work directories of passing runs too")
    parser.add_argument("--json", type=Path, help="append one JSON line per run to this file")
    parser.add_argument("--repair", action="store_true",
                        help="when a run fails, run `marmot-appliance repair` and report whether the files became equal")
    parser.add_argument("--self-test-divergence", action="store_true",
                        help="after quiescence, change one replica's row with capture bypassed: every run must FAIL")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="start no new run once this many minutes have passed (a run in progress finishes)")
    parser.add_argument("--summarize", type=Path, nargs="+", metavar="JSONL",
                        help="print the totals of earlier --json files and exit")
    parser.add_argument("--markdown", action="store_true", help="with --summarize: also a Markdown table of the runs")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        if args.markdown:
            print(runs_table(args.summarize))
        return 0
    if args.runs < 1 or args.duration <= 0 or args.rate <= 0:
        parser.error("--runs, --duration and --rate must be positive")
    kinds = parse_kinds(args.faults)
    if not args.no_clock_shift and not LIBFAKETIME.exists():
        parser.error(f"{LIBFAKETIME} is missing (apt-get install faketime), or pass --no-clock-shift")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    base = args.work_dir or Path(tempfile.mkdtemp(prefix="marmot-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    with_verify = not args.no_verify and verify_available()
    print(f"chaos: {args.runs} run(s) from seed {seed}, work in {base}; verify: "
          f"{'yes' if with_verify else 'not in this build' if not args.no_verify else 'skipped'}", flush=True)
    failed = []
    started = time.monotonic()
    done = 0
    for i in range(args.runs):
        if args.time_budget is not None and time.monotonic() - started > args.time_budget * 60:
            print(f"chaos: time budget of {args.time_budget:g} min used up; no more runs started", flush=True)
            break
        done += 1
        plan = plan_run(seed + i, args.duration, kinds, not args.no_clock_shift)
        work = base / f"run-{plan.seed}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        print(f"run {i + 1}/{args.runs}: {plan.describe()}", flush=True)
        result = run_once(plan, work, args.rate, with_verify, args.self_test_divergence, args.repair,
                          spec_mode=not args.flag_mode)
        for fault in result.faults:
            print(f"    {fault}")
        converge = f"{result.converge_s:.1f}s" if result.converge_s is not None else "never"
        print(f"  -> {'PASS' if result.ok else 'FAIL'}: {result.transactions} transactions "
              f"({result.operations} row operations), {len(result.faults)} faults, converged after healing in "
              f"{converge}, verify {result.verify}, {result.wall_s:.0f}s wall", flush=True)
        if result.repair != "not run":
            print(f"  repair: {result.repair}")
        if args.json:
            with open(args.json, "a", encoding="utf-8") as out:
                out.write(json.dumps({
                    "seed": plan.seed, "duration_s": plan.duration_s, "plan": plan.describe(), "ok": result.ok,
                    "faults": result.faults, "problems": result.problems, "transactions": result.transactions,
                    "operations": result.operations, "converge_s": result.converge_s, "verify": result.verify, "repair": result.repair,
                    "wall_s": round(result.wall_s, 1)}) + "\n")
        if result.ok:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
            continue
        failed.append(plan.seed)
        for problem in result.problems:
            print(f"  problem: {problem}")
        print(f"  work directory kept: {work}")
        print(f"  replay: {replay_command(args, plan.seed)}", flush=True)
        if result.transactions == 0 and any(p.startswith("harness error") for p in result.problems):
            # The cluster never ran (a missing binary, a broken environment): the next seeds would
            # fail the same way and bury the real results under failures that say nothing.
            print("chaos: the harness could not run a cluster at all; stopping", flush=True)
            break
    print(f"chaos: {done - len(failed)}/{done} runs passed" +
          (f"; failed seeds: {' '.join(map(str, failed))}" if failed else ""))
    if not failed and not args.keep and args.work_dir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
