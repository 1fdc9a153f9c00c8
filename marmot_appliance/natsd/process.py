"""Run nats-server as a child process and wait until it is ready."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from marmot_appliance.errors import NatsServerError
from marmot_appliance.natsd.binary import nats_server_path


def fetch_monitor_json(host: str, monitor_port: int, endpoint: str, timeout_s: float = 2.0) -> dict:
    url = f"http://{host}:{monitor_port}/{endpoint.lstrip('/')}"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (local monitor)
        return json.loads(response.read())


def jetstream_meta_leader(host: str, monitor_port: int) -> str | None:
    """The JetStream meta leader's name as this server sees it, or None."""
    try:
        info = fetch_monitor_json(host, monitor_port, "jsz")
    except (OSError, ValueError, urllib.error.URLError):
        return None
    meta = info.get("meta_cluster") or {}
    if not meta:  # a single server is its own leader once JetStream is up
        return info.get("server_id") if info.get("config") else None
    return meta.get("leader") or None


def _meta_peers_current(host: str, monitor_port: int) -> bool:
    """True when this server is the meta leader and sees every other peer current.

    Agreement on a leader is not enough: until the leader has caught up every peer, creating
    an R3 stream can fail with "no suitable peers for placement, peer offline"."""
    try:
        meta = fetch_monitor_json(host, monitor_port, "jsz").get("meta_cluster") or {}
    except (OSError, ValueError, urllib.error.URLError):
        return False
    replicas = meta.get("replicas") or []
    size = meta.get("cluster_size") or 1
    return (
        len(replicas) >= size - 1
        and all(peer.get("current") and not peer.get("offline") for peer in replicas)
    )


def wait_for_meta_leader(servers: list[tuple[str, int]], timeout_s: float = 30.0) -> str:
    """Wait until every server agrees on a JetStream meta leader that has every peer current."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leaders = {jetstream_meta_leader(host, port) for host, port in servers}
        leader = leaders.pop() if len(leaders) == 1 else None
        if leader is not None:
            if len(servers) == 1 or any(_meta_peers_current(host, port) for host, port in servers):
                return leader
        time.sleep(0.1)
    raise NatsServerError(f"no JetStream meta leader with all peers current within {timeout_s:.0f}s")


@dataclass
class NatsServerProcess:
    """A nats-server child process started from a rendered config file."""

    config_path: Path
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        try:
            self.process = subprocess.Popen(
                [str(nats_server_path()), "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()

    def wait_listening(self, host: str, client_port: int, timeout_s: float = 15.0) -> None:
        import socket

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise NatsServerError(f"nats-server exited with {self.process.returncode}:\n{tail}")
            try:
                with socket.create_connection((host, client_port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise NatsServerError(f"nats-server did not listen on {host}:{client_port} in {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop by PID: SIGTERM, then SIGKILL if it does not exit in time."""
        if not self.process or self.process.poll() is not None:
            return
        try:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
