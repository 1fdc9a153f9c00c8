"""Helpers for replication tests: node runtimes (in-process or as real CLI subprocesses),
an order-independent digest of user tables, and polling with generous timeouts.

Used by tests/test_replication_*.py and tests/test_node_*.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from marmot_appliance.node.config import NodeConfig, config_from_flags
from marmot_appliance.node.runtime import NodeRuntime
from tests.harness import free_ports

CONVERGE_TIMEOUT_S = 90.0  # shared 2-core machine: generous, never a speed assertion
BOOKKEEPING_PREFIX = "_marmot_"


def user_tables(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table' ORDER BY name")]
    finally:
        conn.close()
    return [n for n in names if not n.startswith(BOOKKEEPING_PREFIX) and not n.startswith("sqlite_")]


def table_rows(db: Path, table: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        quoted = '"' + table.replace('"', '""') + '"'
        rows = conn.execute(f"SELECT * FROM {quoted}").fetchall()
    finally:
        conn.close()
    return sorted(rows, key=repr)


def external_nats_spec(cluster: str, urls: list[str], dbs: dict[str, Path], ports: dict[str, int] | None = None, *,
                       replication: str = "{shards: 1, log_replicas: 1}", snapshots: str = "{enabled: false}",
                       verify: str | None = None) -> str:
    """A cluster spec for node processes on the tests' own nats-server(s): node `name` of `dbs`
    gets id 1, 2, ... in order, and its metrics port from `ports` (else the default).
    `verify` is the spec's verify section (None: the default)."""
    nodes = "\n".join(
        f"  - {{name: {name}, id: {i}, host: 127.0.0.1, db: {db}"
        + (f", ports: {{metrics: {ports[name]}}}" if ports else "")
        + "}"
        for i, (name, db) in enumerate(dbs.items(), 1)
    )
    return textwrap.dedent(
        f"""\
        apiVersion: marmot-appliance/v1
        kind: Cluster
        name: {cluster}
        replication: {replication}
        snapshots: {snapshots}
        {"verify: " + verify if verify else ""}
        nats:
          embedded: false
          urls: [{", ".join(urls)}]
          auth: none
        nodes:
        """
    ) + nodes + "\n"


def positions(db: Path) -> dict[str, int]:
    """The node's stored position per stream (its `_marmot_positions` table)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        return dict(conn.execute("SELECT stream, seq FROM _marmot_positions").fetchall())
    finally:
        conn.close()


def log_rows(db: Path, table: str) -> int:
    """Captured rows of `table` not yet published (its `_marmot_log_<table>`)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        quoted = '"' + f"_marmot_log_{table}".replace('"', '""') + '"'
        return conn.execute(f"SELECT count(*) FROM {quoted}").fetchone()[0]
    finally:
        conn.close()


def digest(db: Path) -> str:
    """Order-independent digest of every user table; repr keeps 1, 1.0, '1', b'1' and -0.0 apart."""
    h = hashlib.blake2b(digest_size=16)
    for table in user_tables(db):
        h.update(repr((table, table_rows(db, table))).encode())
    return h.hexdigest()


def http_get(url: str, timeout_s: float = 10) -> tuple[int, str]:
    """(HTTP status, body) of a GET; a 503 from /health carries its JSON body too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def wait_until(predicate, timeout_s: float = CONVERGE_TIMEOUT_S, interval_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        result = await asyncio.to_thread(predicate) if not asyncio.iscoroutinefunction(predicate) else await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval_s)


async def wait_converged(dbs: list[Path], timeout_s: float = CONVERGE_TIMEOUT_S) -> str:
    def same() -> bool:
        return len({digest(db) for db in dbs}) == 1

    await wait_until(same, timeout_s, 0.2, "all databases to converge")
    return digest(dbs[0])


def execute(db: Path, sql: str, params=(), many: bool = False) -> None:
    conn = sqlite3.connect(db, timeout=30)
    try:
        with conn:
            (conn.executemany if many else conn.execute)(sql, params)
    finally:
        conn.close()


@dataclass
class InProcessNode:
    """A NodeRuntime run as an asyncio task in the test's event loop."""

    node_id: int
    db: Path
    nats_url: str
    shards: int = 2
    replicas: int = 3
    extra: dict = field(default_factory=dict)
    runtime: NodeRuntime | None = None
    task: asyncio.Task | None = None
    stop_event: asyncio.Event | None = None

    def config(self) -> NodeConfig:
        config = config_from_flags(
            db_path=str(self.db), node_id=self.node_id, nats_url=self.nats_url, shards=self.shards,
            log_replicas=self.replicas, max_log_entries=self.extra.get("max_log_entries", 100_000),
            enable_snapshot=self.extra.get("enable_snapshot", False), metrics_port=0, poll_interval_ms=200,
            seq_map_path=self.extra.get("seq_map_path"),
            **({"subject_prefix": self.extra["prefixes"] + "-subj", "stream_prefix": self.extra["prefixes"] + "-s"}
               if "prefixes" in self.extra else {}),
        )
        if "batch_max_rows" in self.extra:  # small batches: one transaction spans many messages
            replication = config.cluster.replication
            replication = replace(replication, batch=replace(replication.batch, max_rows=self.extra["batch_max_rows"]))
            config = replace(config, cluster=replace(config.cluster, replication=replication))
        return replace(config, use_inotify=self.extra.get("use_inotify", True))

    async def start(self) -> "InProcessNode":
        self.stop_event = asyncio.Event()
        self.runtime = NodeRuntime(self.config())
        self.task = asyncio.create_task(self.runtime.run(self.stop_event), name=f"node-{self.node_id}")
        await wait_until(lambda: self.runtime.consumers or self.task.done(), 60, 0.05, f"node {self.node_id} start")
        if self.task.done():
            self.task.result()  # raise the start-up error
        return self

    async def stop(self) -> int:
        if self.task is None:
            return 0
        self.stop_event.set()
        code = await asyncio.wait_for(self.task, 60)
        self.task = None
        return code

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.runtime.http.port}"


def node_command(node_id: int, db: Path, nats_url: str, shards: int = 2, replicas: int = 3,
                 metrics_port: int | None = None, extra: list[str] | None = None) -> list[str]:
    argv = [sys.executable, "-m", "marmot_appliance", "node", "-db-path", str(db), "-node-id", str(node_id),
            "-nats-url", nats_url, "-shards", str(shards), "-log-replicas", str(replicas),
            "-max-log-entries", "100000", "-enable-snapshot=false"]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port)]
    return argv + (extra or [])


@dataclass
class SubprocessNode:
    """The real CLI (`python -m marmot_appliance node ...`) as a child process, stopped by PID."""

    node_id: int
    db: Path
    nats_url: str
    log_path: Path
    shards: int = 2
    replicas: int = 3
    metrics_port: int = 0
    process: subprocess.Popen | None = None
    extra: list[str] = field(default_factory=list)  # more flags, e.g. ["-enable-snapshot=true"]
    spec: Path | None = None  # run `node --spec SPEC --node NAME` instead of the seed's flags
    name: str | None = None

    @classmethod
    def from_spec(cls, spec: Path, name: str, db: Path, log_path: Path, metrics_port: int) -> "SubprocessNode":
        """Node NAME of a spec (its metrics port must be the spec's, for /health)."""
        return cls(0, db, "", log_path, metrics_port=metrics_port, spec=spec, name=name)

    def start(self) -> "SubprocessNode":
        if self.spec is not None:
            argv = [sys.executable, "-m", "marmot_appliance", "node", "--spec", str(self.spec), "--node", str(self.name)]
        else:
            if not self.metrics_port:
                self.metrics_port = free_ports(1)[0]
            argv = node_command(self.node_id, self.db, self.nats_url, self.shards, self.replicas, self.metrics_port,
                                extra=list(self.extra))
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            log.close()
        return self

    def health(self) -> dict | None:
        return self.health_reply()[1]

    def health_reply(self) -> tuple[int | None, dict | None]:
        """(HTTP status, JSON body) of /health; (None, None) while nothing answers."""
        try:
            code, text = http_get(f"http://127.0.0.1:{self.metrics_port}/health", 5)
            return code, json.loads(text)
        except (OSError, ValueError):
            return None, None

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/metrics", 5)[1]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.process.pid, sig)

    async def wait_healthy(self, timeout_s: float = 60) -> None:
        def ok():
            if self.process.poll() is not None:
                raise AssertionError(f"node {self.node_id} exited: {self.log_path.read_text()[-3000:]}")
            h = self.health()
            return h is not None and h["status"] == "ok" and h["capture"]["installed"]

        await wait_until(ok, timeout_s, 0.1, f"node {self.node_id} healthy")

    def kill9(self) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def terminate(self, timeout_s: float = 60) -> int:
        if not self.process or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise
