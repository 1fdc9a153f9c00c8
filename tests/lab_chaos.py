"""Chaos on lab hosts (docs/reliability.md, "Lab runs"): seeded network partitions between hosts,
`kill -9` and pauses of the node service and restarts of nats-server, under a writer on every
host; then everything is healed and an oracle checks the hosts.

Used by tests/test_lab_deploy.py (one short run in CI, on the lab that module deploys) and by
bench/chaos_lab.py (many runs, recorded in docs/reliability.md). It drives an already deployed
lab (`site.yml` on the hosts of vagrant/cluster.yaml) through tests/test_lab_deploy.py's `Lab`.

Workload: each host's writer inserts, updates and deletes its own keys (`lab-<host>-<seed>-<i>`)
and upserts a few keys every host writes (`lab-contested-<seed>-<k>`), in single-row
transactions, recording each after COMMIT returned. Oracle, after healing: every host holds the
same rows (table digests equal), `marmot-appliance verify` says converged, each host's own keys
are exactly what its writer's log leaves (acknowledged writes kept, deletes kept deleted), and a
contested key holds a value some writer wrote.

Every remote command has a timeout; a fault's command that fails is a problem of the run, which
still heals and checks (`_send`), never a hang or an abort.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.test_lab_deploy import Lab

HOSTS = ("node1", "node2", "node3")
WRITER_PATH = "/tmp/marmot-lab-chaos-writer.py"
CONTESTED_KEYS = 5
FAULT_KINDS = ("partition", "node-kill9", "node-pause", "nats-restart")
FAULT_COMMAND_TIMEOUT_S = 30  # a fault's remote command; every remote command has a timeout
MAIN_PID_WAIT_S = 15.0  # how long a signal fault waits for systemd to have restarted the node
NO_MAIN_PROCESS = "no-main-process"

WRITER = r'''
import json, random, sqlite3, sys, time
db, host, seed, duration, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
rng = random.Random(f"{seed}-{host}")
conn = sqlite3.connect(db, timeout=30)
log = open(out, "w")
mine, i, end = [], 0, time.time() + duration
while time.time() < end:
    i += 1
    roll = rng.random()
    try:
        if roll < 0.15:
            key = f"lab-contested-{seed}-{rng.randrange(CONTESTED)}"
            conn.execute("INSERT INTO items VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET origin = excluded.origin, "
                         "n = excluded.n", (key, host, i))
            conn.commit()
            record = ["contested", key, host, i]
        elif roll < 0.65 or not mine:
            key = f"lab-{host}-{seed}-{i}"
            conn.execute("INSERT INTO items VALUES (?, ?, ?)", (key, host, i))
            conn.commit()
            mine.append(key)
            record = ["insert", key, host, i]
        elif roll < 0.88:
            key = rng.choice(mine)
            conn.execute("UPDATE items SET n = ? WHERE id = ?", (i, key))
            conn.commit()
            record = ["update", key, host, i]
        else:
            key = mine.pop(rng.randrange(len(mine)))
            conn.execute("DELETE FROM items WHERE id = ?", (key,))
            conn.commit()
            record = ["delete", key, host, i]
    except sqlite3.OperationalError:
        conn.rollback()
        time.sleep(0.05)
        continue
    log.write(json.dumps(record) + "\n")
    log.flush()
    time.sleep(rng.uniform(0.01, 0.05))
log.write(json.dumps(["done", i]) + "\n")
log.close()
'''.replace("CONTESTED", str(CONTESTED_KEYS))


@dataclass
class LabRunResult:
    seed: int
    duration_s: float
    faults: list[str] = field(default_factory=list)
    operations: int = 0
    problems: list[str] = field(default_factory=list)
    converge_s: float | None = None
    verify: str = "not run"
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict:
        return {"seed": self.seed, "duration_s": self.duration_s, "faults": self.faults, "operations": self.operations,
                "problems": self.problems, "converge_s": self.converge_s, "verify": self.verify,
                "wall_s": round(self.wall_s, 1), "ok": self.ok}


def prepare_items_table(lab) -> None:
    """The table the lab's tests use, on every host, replicating both ways (what
    test_lab_deploy's first test leaves behind; bench/chaos_lab.py starts from a bare deploy)."""
    for host in HOSTS:
        lab.execute(host, "CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, origin TEXT, n INTEGER)")
    lab.execute("node1", "INSERT OR REPLACE INTO items VALUES (?, ?, ?)", ["chaos-warm-up-1", "node1", 1])
    lab.wait_for_rows(["node2", "node3"], {"chaos-warm-up-1"})
    lab.execute("node3", "INSERT OR REPLACE INTO items VALUES (?, ?, ?)", ["chaos-warm-up-3", "node3", 3])
    lab.wait_for_rows(["node1", "node2"], {"chaos-warm-up-3"})


def plan_faults(seed: int, duration_s: float) -> list[tuple[float, str, str, float]]:
    """(start offset, kind, host, seconds) drawn from the seed; one fault at a time."""
    rng = random.Random(seed)
    faults, at = [], rng.uniform(2, 5)
    while at < duration_s - 3:
        kind = rng.choice(FAULT_KINDS)
        seconds = 0.0 if kind in ("node-kill9", "nats-restart") else rng.uniform(3, 12)
        faults.append((at, kind, rng.choice(HOSTS), seconds))
        at += seconds + rng.uniform(2, 6)
    return faults


def run_lab_chaos(lab, spec: Path, seed: int, duration_s: float, say=print) -> LabRunResult:
    """One run on the deployed lab; never leaves a host cut off or paused."""
    from marmot_appliance.lab.network import set_link

    result = LabRunResult(seed, duration_s)
    started = time.monotonic()
    logs = {host: f"/tmp/marmot-lab-chaos-{seed}-{host}.jsonl" for host in HOSTS}
    for host in HOSTS:
        lab.ssh(host, f"cat > {WRITER_PATH}", input_text=WRITER)
        lab.ssh(host, f"nohup /opt/marmot-appliance/venv/bin/python {WRITER_PATH} /var/lib/marmot-appliance/data/app.db "
                      f"{host} {seed} {duration_s} {logs[host]} </dev/null >/dev/null 2>&1 &")
    cut: set[str] = set()
    paused: dict[str, str] = {}  # host -> the PID its pause stopped ("" while not known)
    try:
        for at, kind, host, seconds in plan_faults(seed, duration_s):
            delay = at - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
            result.faults.append(f"t+{at:.0f}s {kind} {host}" + (f" {seconds:.0f}s" if seconds else ""))
            say(f"    {result.faults[-1]}")
            if kind == "partition":
                set_link(lab.topology, host, up=False)
                cut.add(host)
                lab.console = set(cut)  # ssh cannot reach a host that is cut off
                time.sleep(seconds)
                set_link(lab.topology, host, up=True)
                cut.discard(host)
                lab.console = set(cut)
            elif kind == "node-kill9":  # Restart=on-failure brings it back
                if _send(lab, host, signal_main_script("KILL"), result) == NO_MAIN_PROCESS:
                    _skipped(result, say)
            elif kind == "node-pause":
                paused[host] = ""  # stopped or not, the finally resumes it if the run stops here
                pid = _send(lab, host, signal_main_script("STOP"), result)
                if pid == NO_MAIN_PROCESS:
                    _skipped(result, say)
                    del paused[host]
                elif pid:
                    paused[host] = pid
                    time.sleep(seconds)
                    _send(lab, host, f"kill -CONT {pid}", result)
                    del paused[host]
                # "" (the command failed, a problem of the run): the finally resumes the main process
            elif kind == "nats-restart":
                _send(lab, host, "systemctl restart nats-server", result)
        remaining = duration_s - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
    finally:
        for host in list(cut):
            set_link(lab.topology, host, up=True)
        lab.console = set()
        for host, pid in paused.items():
            _send(lab, host, f"kill -CONT {pid}" if pid else signal_main_script("CONT"), result)
    if _wait_for_writers(lab, logs, result):  # a fault command that failed does not stop the oracle
        _oracle(lab, spec, logs, result)
    result.wall_s = time.monotonic() - started
    return result


def signal_main_script(name: str, wait_s: float = MAIN_PID_WAIT_S) -> str:
    """Shell that sends SIG`name` to the node service's main process and prints its PID, or
    prints NO_MAIN_PROCESS if systemd has none for `wait_s` seconds.

    Only the main process: `systemctl kill` signals every process of the unit, which fails inside
    the lab's containers. Never `kill -SIG $(systemctl show …)` unguarded: while systemd restarts
    the unit (RestartSec after a `kill -9`) MainPID is 0, and `kill -STOP 0` stops the remote
    shell's own process group, so the ssh session never answers (seed 509, docs/reliability.md)."""
    tries = max(1, round(wait_s / 0.5))
    return (
        f"i=0; while [ $i -lt {tries} ]; do i=$((i + 1)); "
        "pid=$(systemctl show -p MainPID --value marmot-node); "
        'case "$pid" in ""|0|*[!0-9]*) ;; '
        f'*) if kill -{name} "$pid" 2>/dev/null; then echo "$pid"; exit 0; fi ;; esac; '
        f"sleep 0.5; done; echo {NO_MAIN_PROCESS}"
    )


def _send(lab: Lab, host: str, command: str, result: LabRunResult) -> str:
    """Run a fault's command on a host, bounded: over ssh, or through the host's console (no
    network) when ssh does not answer in time; a command that fails both ways is a problem of the
    run (the run goes on to heal and check), never a hang or an abort. Returns its output."""
    try:
        return lab.ssh(host, command, timeout_s=FAULT_COMMAND_TIMEOUT_S).strip()
    except (AssertionError, subprocess.SubprocessError) as exc:
        first = f"{type(exc).__name__}: {exc}"
    saved = lab.console
    lab.console = set(saved or set()) | {host}
    try:
        return lab.ssh(host, command, timeout_s=FAULT_COMMAND_TIMEOUT_S).strip()
    except (AssertionError, subprocess.SubprocessError) as exc:
        result.problems.append(f"{host}: fault command {command!r} failed over ssh ({first[:500]}) and through "
                               f"the console ({type(exc).__name__}: {str(exc)[:500]})")
        return ""
    finally:
        lab.console = saved


def _skipped(result: LabRunResult, say: Callable[[str], None]) -> None:
    """A signal fault that found no main process (the node was mid-restart) is recorded as such."""
    result.faults[-1] += f" (skipped: no main process for {MAIN_PID_WAIT_S:.0f}s)"
    say(f"      skipped: no main process for {MAIN_PID_WAIT_S:.0f}s")


def _wait_for_writers(lab, logs: dict[str, str], result: LabRunResult, timeout_s: float = 60) -> bool:
    """Whether every host's writer finished (its log is whole, so the oracle can replay it)."""
    deadline = time.monotonic() + timeout_s
    finished = True
    for host, path in logs.items():
        while '"done"' not in lab.ssh(host, f"tail -n 1 {path} 2>/dev/null || true", timeout_s=30):
            if time.monotonic() > deadline:
                result.problems.append(f"{host}: its writer did not finish")
                finished = False
                break
            time.sleep(1)
    return finished


def _replay(lines: list[list]) -> tuple[dict[str, int], set[str], dict[str, set]]:
    """(own key -> value it must hold, own keys that must be gone, contested key -> values written)."""
    own: dict[str, int] = {}
    gone: set[str] = set()
    contested: dict[str, set] = {}
    for record in lines:
        op = record[0]
        if op in ("insert", "update"):
            own[record[1]] = record[3]
            gone.discard(record[1])
        elif op == "delete":
            own.pop(record[1], None)
            gone.add(record[1])
        elif op == "contested":
            contested.setdefault(record[1], set()).add((record[2], record[3]))
    return own, gone, contested


def _oracle(lab, spec: Path, logs: dict[str, str], result: LabRunResult, timeout_s: float = 240) -> None:
    started = time.monotonic()
    digests: list = []
    while time.monotonic() - started < timeout_s:
        digests = [lab.digest(host) for host in HOSTS]
        if digests[0] == digests[1] == digests[2]:
            result.converge_s = round(time.monotonic() - started, 1)
            break
        time.sleep(2)
    else:
        result.problems.append(f"digests still differ after {timeout_s:.0f}s: {digests}\n{lab.diagnostics(list(HOSTS))}")
        return
    # From the controller namespace, never the root one (lab traffic stays inside the lab).
    verify = subprocess.run(
        ["ip", "netns", "exec", lab.topology.controller_namespace, sys.executable, "-m", "marmot_appliance",
         "verify", str(spec), "--state-dir", str(lab.controller_state), "--timeout", "120"],
        capture_output=True, text=True, timeout=300, env=lab.env, check=False)
    result.verify = {0: "converged", 1: "diverged", 2: "undecided"}.get(verify.returncode, f"exit {verify.returncode}")
    if verify.returncode != 0:
        result.problems.append(f"verify: {result.verify}: {verify.stdout[-2000:]}{verify.stderr[-2000:]}")
    rows = _rows(lab, "node1")
    written: dict[str, set] = {}  # contested key -> every (host, value) some writer wrote
    replays = {}
    for host, path in logs.items():
        lines = [json.loads(line) for line in lab.ssh(host, f"cat {path}").splitlines() if line.strip()]
        result.operations += len(lines) - 1
        replays[host] = _replay(lines)
        for key, values in replays[host][2].items():
            written.setdefault(key, set()).update(values)
        lab.ssh(host, f"rm -f {path}")
    for host, (own, gone, _contested) in replays.items():
        wrong = {key: (rows.get(key), (host, value)) for key, value in own.items() if rows.get(key) != (host, value)}
        if wrong:
            result.problems.append(f"{host}: {len(wrong)} acknowledged write(s) missing or different (found, "
                                   f"expected), e.g. {dict(list(wrong.items())[:3])}")
        back = sorted(key for key in gone if key in rows)
        if back:
            result.problems.append(f"{host}: {len(back)} deleted key(s) came back, e.g. {back[:3]}")
    for key, value in rows.items():  # this run's contested keys (earlier runs' stay in the table)
        if key.startswith(f"lab-contested-{result.seed}-") and value not in written.get(key, set()):
            result.problems.append(f"contested key {key} holds {value}, which no writer wrote")


def _rows(lab, host: str) -> dict[str, tuple]:
    script = (
        "import json, sqlite3\n"
        "c = sqlite3.connect('/var/lib/marmot-appliance/data/app.db', timeout=30)\n"
        "print(json.dumps([list(r) for r in c.execute(\"SELECT id, origin, n FROM items WHERE id LIKE 'lab-%'\")]))\n"
    )
    return {key: (row_host, n) for key, row_host, n in json.loads(lab.python(host, script))}
