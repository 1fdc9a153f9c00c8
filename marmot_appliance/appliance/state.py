"""The state directory: where everything the local appliance creates lives.

Layout (under `nats_client.default_state_dir(cluster)`):

    .marmot-appliance-state     marker: `destroy --purge` only deletes a directory carrying it
    .lock                       flock held by apply / destroy
    state.json                  per resource: desired-config hash, PID, argv, process start time
    secrets/                    0700; nats-credentials.json 0600 (generated auth)
    nats/<node>/nats-server.conf  0600 (holds the password when auth is on)
    nats/<node>/jetstream/      JetStream store (unless nats.jetstream.store_dir is set)
    logs/<resource>.log         stdout+stderr of every process

state.json is rewritten atomically (temp file + rename) after every process start or stop, so
an interrupted apply leaves a record of exactly the processes it started.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from marmot_appliance.appliance.errors import ApplianceError, StateLockedError

MARKER_FILE = ".marmot-appliance-state"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
STATE_FORMAT = 1


@dataclass
class ProcessRecord:
    """One running (or last started) process of a resource."""

    resource: str  # "nats-server/n1", "node/n1"
    config_hash: str  # hash of everything that shaped the process when it was started
    pid: int
    argv: list[str]
    start_ticks: int  # /proc/<pid>/stat starttime: tells a reused PID apart
    log_path: str
    started_at: float  # unix time
    # facet -> hash (e.g. "node settings", "replication"): lets plan say *what* changed
    facets: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "ProcessRecord":
        return cls(
            resource=str(data["resource"]),
            config_hash=str(data["config_hash"]),
            pid=int(data["pid"]),
            argv=[str(a) for a in data["argv"]],
            start_ticks=int(data["start_ticks"]),
            log_path=str(data["log_path"]),
            started_at=float(data["started_at"]),
            facets={str(k): str(v) for k, v in (data.get("facets") or {}).items()},
        )


@dataclass
class RecordedState:
    cluster: str
    processes: dict[str, ProcessRecord] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "cluster": self.cluster,
                "processes": {name: asdict(rec) for name, rec in sorted(self.processes.items())},
            },
            indent=2,
        )


@dataclass(frozen=True)
class StateDir:
    """Paths inside one appliance state directory (no I/O in the path helpers)."""

    root: Path

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def marker(self) -> Path:
        return self.root / MARKER_FILE

    def nats_dir(self, node_name: str) -> Path:
        return self.root / "nats" / node_name

    def nats_config(self, node_name: str) -> Path:
        return self.nats_dir(node_name) / "nats-server.conf"

    def default_store_dir(self, node_name: str) -> Path:
        return self.nats_dir(node_name) / "jetstream"

    def log_path(self, resource: str) -> Path:
        return self.logs_dir / (resource.replace("/", "-") + ".log")

    def exists(self) -> bool:
        return self.root.is_dir()

    def is_appliance_dir(self) -> bool:
        return self.marker.is_file()

    # -- I/O -----------------------------------------------------------------------------------

    def create(self, cluster_name: str) -> None:
        """Create the directory tree. Refuses a non-empty directory that is not ours."""
        if self.root.exists() and not self.root.is_dir():
            raise ApplianceError(f"state directory {self.root} exists and is not a directory")
        if self.root.is_dir() and any(self.root.iterdir()) and not self.is_appliance_dir():
            raise ApplianceError(
                f"state directory {self.root} is not empty and was not created by marmot-appliance; "
                "choose another deploy.state_dir"
            )
        try:
            if not self.root.exists():
                # JetStream stores hold copies of replicated rows: owner-only, like the databases'
                # secrets. Parents are created with default modes (they may be shared).
                self.root.parent.mkdir(parents=True, exist_ok=True)
                self.root.mkdir(mode=0o700)
            # An existing state directory (ours: a foreign non-empty one was refused above) is
            # tightened too: it holds configs with secrets, JetStream stores and logs.
            os.chmod(self.root, 0o700)
            self.logs_dir.mkdir(exist_ok=True)
            self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.secrets_dir, 0o700)
            if not self.marker.exists():
                self.marker.write_text(f"marmot-appliance state directory of cluster {cluster_name}\n")
        except OSError as exc:
            raise ApplianceError(f"cannot create state directory {self.root}: {exc.strerror}") from exc

    def load(self, cluster_name: str) -> RecordedState:
        """The recorded state; empty when nothing was applied yet."""
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return RecordedState(cluster=cluster_name)
        except (OSError, ValueError) as exc:
            raise ApplianceError(f"state file {self.state_file} is unreadable: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ApplianceError(f"state file {self.state_file} has an unknown format")
        if data.get("cluster") != cluster_name:
            raise ApplianceError(
                f"state directory {self.root} belongs to cluster {data.get('cluster')!r}, "
                f"not {cluster_name!r}"
            )
        try:
            processes = {
                name: ProcessRecord.from_dict(rec) for name, rec in (data.get("processes") or {}).items()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ApplianceError(f"state file {self.state_file} is damaged: {exc}") from exc
        return RecordedState(cluster=cluster_name, processes=processes)

    def save(self, state: RecordedState) -> None:
        write_private_file(self.state_file, state.to_json(), mode=0o644)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock for the whole apply/destroy: two at once would race on PIDs."""
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StateLockedError(
                    f"another marmot-appliance apply or destroy is using {self.root}; try again when it is done"
                ) from exc
            yield
        finally:
            os.close(fd)


def write_private_file(path: Path, text: str, mode: int = 0o600) -> None:
    """Write atomically with `mode` from the first byte (never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or O_CREAT met an old file
        with os.fdopen(fd, "w") as handle:
            fd = -1
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
