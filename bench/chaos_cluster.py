"""The chaos harness's local cluster: nats-servers, node runtimes and writers as real processes.

Three JetStream servers (tests/harness.py's NatsCluster, R3 streams) and one
`marmot-appliance node` process plus one writer process per node, all on 127.0.0.1. Every
process is started and stopped by PID; a paused (SIGSTOP) process is continued before it is
stopped. One node (and its writer) may run with its wall clock shifted through libfaketime.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import NatsCluster, free_ports

ROOT = Path(__file__).resolve().parent.parent
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
STREAM_PREFIX = "marmot-changes"
SUBJECT_PREFIX = "marmot-change-log"


def faketime_env(shift_s: float) -> dict[str, str]:
    """Environment that shifts a process's wall clock by shift_s (libfaketime; Debian's faketime)."""
    if not LIBFAKETIME.exists():
        raise RuntimeError(f"{LIBFAKETIME} not found: apt-get install faketime, or run with --no-clock-shift")
    # The monotonic clock is shifted too: with FAKETIME_DONT_FAKE_MONOTONIC a negative shift makes
    # Python's time.sleep fail with EINVAL (libfaketime 0.9.10).
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"{shift_s:+.0f}s", "FAKETIME_NO_CACHE": "1"}


def _signal(process: subprocess.Popen | None, signum: int) -> None:
    if process is not None and process.poll() is None:
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass


@dataclass
class NodeSettings:
    shards: int = 4
    max_log_entries: int = 300
    log_replicas: int = 3
    # True: the nodes run from one cluster spec (`node --spec … --node nodeN`, the documented
    # path: the node list is known, so tombstone collection and gap closing take part).
    # False: the seed's flags (`node -node-id N -nats-url …`), which know no node list.
    spec_mode: bool = True


@dataclass
class Node:
    node_id: int
    db: Path
    log_path: Path
    metrics_port: int
    clock_shift_s: float = 0.0
    process: subprocess.Popen | None = None
    paused: bool = False

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        if self.clock_shift_s:
            env.update(faketime_env(self.clock_shift_s))
        return env

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self) -> tuple[int, dict] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/health", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read())
            except ValueError:
                return exc.code, {}
        except (OSError, ValueError):
            return None


@dataclass
class LocalCluster:
    work: Path
    size: int = 3
    settings: NodeSettings = field(default_factory=NodeSettings)
    clock_shifts: dict[int, float] = field(default_factory=dict)
    nats: NatsCluster | None = None
    nodes: list[Node] = field(default_factory=list)
    writers: dict[int, subprocess.Popen] = field(default_factory=dict)
    paused_servers: set[int] = field(default_factory=set)
    aborting: threading.Event = field(default_factory=threading.Event)  # ends waits of cancelled faults

    # -- set-up ----------------------------------------------------------------------------------

    def start_nats(self) -> None:
        (self.work / "nats").mkdir(parents=True, exist_ok=True)
        self.nats = NatsCluster(root=self.work / "nats")
        self.nats.start(3)

    def add_nodes(self, create_database) -> None:
        ports = free_ports(self.size)
        for i in range(1, self.size + 1):
            db = create_database(self.work / f"node{i}.db")
            self.nodes.append(Node(i, db, self.work / f"node{i}.log", ports[i - 1], self.clock_shifts.get(i, 0.0)))
        if self.settings.spec_mode:
            self.write_spec()

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id - 1]

    @property
    def nats_url(self) -> str:
        return self.nats.url

    @property
    def spec_path(self) -> Path:
        return self.work / "cluster.yaml"

    def write_spec(self) -> None:
        """The cluster spec of spec mode: external nats-servers, the nodes' files and ports, the
        run's settings (snapshots every half of the retention, as flag mode does)."""
        s = self.settings
        nodes = "\n".join(
            f"  - {{name: node{n.node_id}, id: {n.node_id}, host: 127.0.0.1, db: '{n.db}', "
            f"ports: {{metrics: {n.metrics_port}}}}}"
            for n in self.nodes
        )
        self.spec_path.write_text(
            "apiVersion: marmot-appliance/v1\nkind: Cluster\nname: chaos\n"
            f"replication: {{shards: {s.shards}, log_replicas: {s.log_replicas}, max_log_entries: {s.max_log_entries}}}\n"
            f"snapshots: {{enabled: true, every_entries: {max(1, s.max_log_entries // 2)}}}\n"
            f"nats:\n  embedded: false\n  urls: [{', '.join(self.nats.urls)}]\n  auth: none\n"
            f"nodes:\n{nodes}\n"
        )

    def _node_args(self, node: Node) -> list[str]:
        """How a CLI command names this node: from the spec, or by the seed's flags."""
        if self.settings.spec_mode:
            return ["--spec", str(self.spec_path), "--node", f"node{node.node_id}"]
        return ["--nats-url", self.nats_url, "--db-path", str(node.db), "--node-id", str(node.node_id),
                "--shards", str(self.settings.shards)]

    def node_argv(self, node: Node) -> list[str]:
        s = self.settings
        if s.spec_mode:
            return [sys.executable, "-m", "marmot_appliance", "node", *self._node_args(node)]
        return [sys.executable, "-m", "marmot_appliance", "node", "-db-path", str(node.db),
                "-node-id", str(node.node_id), "-nats-url", self.nats_url, "-shards", str(s.shards),
                "-log-replicas", str(s.log_replicas), "-max-log-entries", str(s.max_log_entries),
                "-enable-snapshot=true", "--metrics-port", str(node.metrics_port)]

    # -- node processes --------------------------------------------------------------------------

    def start_node(self, node: Node) -> None:
        with open(node.log_path, "ab") as log:
            log.write(f"\n==== chaos: start at {time.time():.3f}\n".encode())
            log.flush()
            node.process = subprocess.Popen(self.node_argv(node), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, env=node.env())
        node.paused = False

    def wait_healthy(self, node: Node, timeout_s: float) -> str | None:
        """None once /health says ok with capture installed; else why not (exit, or timeout)."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline and not self.aborting.is_set():
            if not node.running:
                code = node.process.returncode if node.process else None
                return f"node {node.node_id} exited with {code}: {self.log_tail(node)}"
            last = node.health()
            if last and last[0] == 200 and last[1].get("capture", {}).get("installed"):
                return None
            time.sleep(0.2)
        return f"node {node.node_id} not healthy after {timeout_s:.0f}s: {json.dumps(last[1]) if last else 'no answer'}"

    def log_tail(self, node: Node, lines: int = 12) -> str:
        try:
            return " | ".join(node.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill9_node(self, node: Node) -> None:
        _signal(node.process, signal.SIGCONT)
        _signal(node.process, signal.SIGKILL)
        if node.process:
            node.process.wait(timeout=30)
        node.paused = False

    def stop_node(self, node: Node, timeout_s: float = 60) -> int | None:
        """Graceful stop (SIGTERM); SIGKILL if it does not exit in time."""
        if not node.running:
            return node.process.returncode if node.process else None
        _signal(node.process, signal.SIGCONT)
        _signal(node.process, signal.SIGTERM)
        try:
            return node.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9_node(node)
            return None

    def pause_node(self, node: Node) -> None:
        _signal(node.process, signal.SIGSTOP)
        node.paused = True

    def resume_node(self, node: Node) -> None:
        _signal(node.process, signal.SIGCONT)
        node.paused = False

    def save_snapshot(self, node: Node) -> subprocess.CompletedProcess:
        """`marmot-appliance snapshot save --force` from a (running) node's database."""
        argv = [sys.executable, "-m", "marmot_appliance", "snapshot", "save", "--force", *self._node_args(node)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=180, env=node.env())

    def restore_snapshot(self, node: Node) -> subprocess.CompletedProcess:
        """`marmot-appliance snapshot restore` into a stopped node's database."""
        argv = [sys.executable, "-m", "marmot_appliance", "snapshot", "restore", *self._node_args(node)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=180, env=node.env())

    # -- nats-servers ----------------------------------------------------------------------------

    def kill9_server(self, index: int) -> None:
        process = self.nats.processes[index]
        _signal(process.process, signal.SIGCONT)
        process.kill()
        self.paused_servers.discard(index)

    def start_server(self, index: int) -> None:
        self.nats.processes[index].start()
        self.nats.processes[index].wait_listening("127.0.0.1", self.nats.configs[index].client_port, timeout_s=30)

    def server_running(self, index: int) -> bool:
        process = self.nats.processes[index].process
        return process is not None and process.poll() is None

    def pause_server(self, index: int) -> None:
        _signal(self.nats.processes[index].process, signal.SIGSTOP)
        self.paused_servers.add(index)

    def resume_server(self, index: int) -> None:
        _signal(self.nats.processes[index].process, signal.SIGCONT)
        self.paused_servers.discard(index)

    # -- writers ---------------------------------------------------------------------------------

    def writer_log(self, node_id: int) -> Path:
        return self.work / f"ops-{node_id}.jsonl"

    def start_writers(self, seed: int, rate: float) -> None:
        for node in self.nodes:
            argv = [sys.executable, str(ROOT / "bench" / "chaos_workload.py"), "--db", str(node.db),
                    "--node-id", str(node.node_id), "--seed", str(seed * 1000 + node.node_id),
                    "--log", str(self.writer_log(node.node_id)), "--rate", str(rate)]
            with open(self.work / f"writer{node.node_id}.log", "ab") as log:
                # The writer shares its node's clock: versions are taken in the writer's transaction.
                self.writers[node.node_id] = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, env=node.env())

    def pause_writer(self, node_id: int, timeout_s: float = 60) -> bool:
        """Ask the node's writer to stop committing; True once it says it has (between transactions)."""
        log = self.writer_log(node_id)
        log.with_suffix(".pause").touch()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if log.with_suffix(".paused").exists():
                return True
            time.sleep(0.05)
        return False

    def resume_writer(self, node_id: int) -> None:
        self.writer_log(node_id).with_suffix(".pause").unlink(missing_ok=True)

    def stop_writers(self) -> list[str]:
        problems = []
        for node_id, process in self.writers.items():
            _signal(process, signal.SIGTERM)
        for node_id, process in self.writers.items():
            try:
                code = process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                _signal(process, signal.SIGKILL)
                process.wait(timeout=10)
                code = "killed"
            if code != 0:
                problems.append(f"writer {node_id} exited with {code}")
        return problems

    # -- healing and teardown --------------------------------------------------------------------

    def heal(self, timeout_s: float) -> list[str]:
        """Continue what is paused, start what is down, and wait until every node is healthy."""
        for node_id in self.writers:
            self.resume_writer(node_id)
        for index in list(self.paused_servers):
            self.resume_server(index)
        for index in range(len(self.nats.processes)):
            if not self.server_running(index):
                self.start_server(index)
        problems = []
        for node in self.nodes:
            if node.paused:
                self.resume_node(node)
            if not node.running:
                if node.process is not None and node.process.returncode not in (None, -signal.SIGKILL, 0):
                    problems.append(f"node {node.node_id} had exited by itself with {node.process.returncode}: "
                                    f"{self.log_tail(node)}")
                self.start_node(node)
        for node in self.nodes:
            why = self.wait_healthy(node, timeout_s)
            if why:
                problems.append(why)
        return problems

    def teardown(self) -> None:
        for process in self.writers.values():
            _signal(process, signal.SIGCONT)
            _signal(process, signal.SIGKILL)
            process.wait(timeout=10)
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                self.kill9_node(node)
        if self.nats:
            for index in list(self.paused_servers):
                self.resume_server(index)
            self.nats.stop()
