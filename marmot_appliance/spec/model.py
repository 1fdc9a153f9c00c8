"""The typed cluster model: what the rest of the code reads.

The loader (`marmot_appliance.spec.loader`) validates a YAML spec against the JSON Schema,
applies defaults in one explicit step (`marmot_appliance.spec.defaults`), runs the semantic
checks, and returns a `Cluster`. Nothing else parses spec files.

Defaults live here (as dataclass defaults) and in the schema's `default` keywords; a test keeps
the two in sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

API_VERSION = "marmot-appliance/v1"
SUPPORTED_API_VERSIONS = (API_VERSION,)

DEFAULT_CLIENT_PORT = 4222
DEFAULT_CLUSTER_PORT = 6222
DEFAULT_MONITOR_PORT = 8222
DEFAULT_METRICS_PORT = 9470


@dataclass(frozen=True)
class TableSelection:
    """Which tables a node captures and applies. Empty include = every table."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def selects(self, table: str) -> bool:
        if self.include and table not in self.include:
            return False
        return table not in self.exclude


@dataclass(frozen=True)
class NodePorts:
    """Ports on the node's host, after per-node overrides were applied."""

    client: int = DEFAULT_CLIENT_PORT
    cluster: int = DEFAULT_CLUSTER_PORT
    monitor: int = DEFAULT_MONITOR_PORT
    metrics: int = DEFAULT_METRICS_PORT


@dataclass(frozen=True)
class Node:
    name: str
    id: int
    host: str  # where Ansible (or the local apply) reaches the node
    advertise: str  # address other NATS servers and clients use; defaults to host
    db: str  # absolute path to the SQLite database
    publish: bool = True  # capture local changes and publish them
    replicate: bool = True  # apply other nodes' changes
    tables: TableSelection = field(default_factory=TableSelection)
    ports: NodePorts = field(default_factory=NodePorts)
    seq_map_path: str | None = None  # optional CBOR copy of applied positions (seed option)

    @property
    def is_local(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class JetStreamSettings:
    store_dir: str | None = None  # None: <state_dir>/nats/<node> locally, /var/lib/marmot-appliance/nats remotely
    max_memory: str = "256MB"
    max_file: str = "10GB"


@dataclass(frozen=True)
class NatsAuth:
    """How clients authenticate to NATS.

    mode:
      generated  apply creates a user + random password (mode 0600 in the state dir)
      none       no authentication (explicit opt-out)
      user       user + password read from password_file
      nkey       nkey seed read from nkey_seed_file
    """

    mode: Literal["generated", "none", "user", "nkey"] = "generated"
    user: str = "marmot"
    password_file: str | None = None
    nkey_seed_file: str | None = None


@dataclass(frozen=True)
class NatsTLS:
    """TLS for client connections and, between the embedded servers, mutual TLS on routes."""

    cert: str
    key: str
    ca: str | None = None
    verify_clients: bool = False  # clients must present a certificate the CA signed (mTLS)


@dataclass(frozen=True)
class NatsSettings:
    embedded: bool = True
    urls: tuple[str, ...] = ()  # external servers (embedded: false)
    client_port: int = DEFAULT_CLIENT_PORT
    cluster_port: int = DEFAULT_CLUSTER_PORT
    monitor_port: int = DEFAULT_MONITOR_PORT
    # The monitor port is plain HTTP and lists every client (/connz): loopback unless asked.
    monitor_address: str = "127.0.0.1"
    jetstream: JetStreamSettings = field(default_factory=JetStreamSettings)
    auth: NatsAuth = field(default_factory=NatsAuth)
    tls: NatsTLS | None = None
    connect_timeout_s: float = 5.0


@dataclass(frozen=True)
class BatchLimits:
    max_rows: int = 500
    max_bytes: int = 1_048_576
    max_delay_ms: int = 2


@dataclass(frozen=True)
class CompressionSettings:
    level: int = 3  # zstd level; 0 disables compression
    min_bytes: int = 512  # payloads smaller than this are sent uncompressed


@dataclass(frozen=True)
class ReplicationSettings:
    shards: int = 1
    log_replicas: int | None = None  # None: min(3, number of NATS servers)
    max_log_entries: int = 100_000
    subject_prefix: str = "marmot-change-log"
    stream_prefix: str = "marmot-changes"
    batch: BatchLimits = field(default_factory=BatchLimits)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    poll_interval_ms: int = 500  # fallback poll when no commit wake-up arrives
    cleanup_interval_s: float = 5.0  # how often published log rows are deleted
    # Rows whose version lies further ahead of the receiver's clock are held until it catches up.
    max_clock_skew_s: float = 60.0
    max_parked_rows: int = 100_000  # parked + held rows kept per node; beyond that, dead-lettered
    # Tombstone collection (docs/capture.md): how often a node publishes its horizon record and
    # collects; a node whose record is older than the timeout is left out (re-seeded on return).
    tombstone_interval_s: float = 30.0
    tombstone_node_timeout_s: float = 7 * 86400.0
    # Bounded bookkeeping (docs/capture.md): dead letters kept (the oldest go beyond, counted),
    # and when the change log counts as not draining (an alarm; its rows are never dropped).
    max_dead_letters: int = 100_000
    change_log_alarm_rows: int = 1_000_000
    change_log_alarm_age_s: float = 600.0

    def stream_name(self, shard: int) -> str:
        return f"{self.stream_prefix}-{shard}"

    def subject(self, shard: int) -> str:
        return f"{self.subject_prefix}-{shard}"


@dataclass(frozen=True)
class SnapshotSettings:
    enabled: bool = True
    every_entries: int | None = 50_000  # save after this many published entries cluster-wide
    interval_s: float | None = None  # and/or on this interval
    keep: int = 2
    replicas: int | None = None  # None: same as the log replicas
    bucket: str | None = None  # None: "<stream_prefix>-snapshots"


@dataclass(frozen=True)
class VerifySettings:
    """The continuous convergence check every node runs (docs/reliability.md)."""

    interval_s: float | None = 600.0  # compare bucket digests with the other nodes this often; None: off
    auto_repair: bool = False  # the lowest-id node repairs a divergence it finds (as `repair` would)


@dataclass(frozen=True)
class ObservabilitySettings:
    listen_address: str = "127.0.0.1"  # metrics/health bind address; port is the node's metrics port
    metrics_port: int = DEFAULT_METRICS_PORT  # cluster-wide default of nodes[].ports.metrics
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class DeploySettings:
    ssh_user: str | None = None  # None: Ansible's default (the controller's user, ssh config)
    become: bool = False
    package_source: str = "build"  # "build": the controller builds wheels; or a directory of wheels
    service_manager: Literal["systemd", "supervisor"] = "systemd"
    install_dir: str = "/opt/marmot-appliance"
    state_dir: str | None = None  # local apply: None = "<spec dir>/.marmot-appliance/<name>"


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: tuple[Node, ...]
    api_version: str = API_VERSION
    # SQL files declaring the database schema, absolute paths, in order (docs/schema.md).
    # Empty: the applications manage their own schema.
    schema: tuple[str, ...] = ()
    nats: NatsSettings = field(default_factory=NatsSettings)
    replication: ReplicationSettings = field(default_factory=ReplicationSettings)
    snapshots: SnapshotSettings = field(default_factory=SnapshotSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    deploy: DeploySettings = field(default_factory=DeploySettings)
    source: Path | None = None  # the spec file this came from, if any
    # False in flag mode (`node -node-id N ...`): `nodes` holds this node only, the others are
    # unknown. Whatever needs every node's word (tombstone collection) must then not act.
    nodes_known: bool = True

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def nats_server_count(self) -> int:
        return len(self.nodes) if self.nats.embedded else len(self.nats.urls)

    @property
    def effective_log_replicas(self) -> int:
        if self.replication.log_replicas is not None:
            return self.replication.log_replicas
        return max(1, min(3, self.nats_server_count))

    @property
    def snapshot_bucket(self) -> str:
        return self.snapshots.bucket or f"{self.replication.stream_prefix}-snapshots"

    @property
    def is_local(self) -> bool:
        return all(node.is_local for node in self.nodes)
