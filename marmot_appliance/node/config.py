"""What one node process runs with, built from a cluster spec or from the seed's flags.

The seed (Marmot) configured a node with flags only; those keep working and become a one-node
`Cluster` model, so the rest of the runtime reads a single shape either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from marmot_appliance.errors import MarmotError
from marmot_appliance.spec.model import (
    Cluster,
    NatsAuth,
    NatsSettings,
    Node,
    NodePorts,
    ReplicationSettings,
    SnapshotSettings,
)

# The seed README's defaults for its flags.
SEED_SHARDS = 8
SEED_MAX_LOG_ENTRIES = 1024
SEED_LOG_REPLICAS = 1
SEED_SUBJECT_PREFIX = "marmot-change-log"
SEED_STREAM_PREFIX = "marmot-changes"
SEED_NATS_URL = "nats://127.0.0.1:4222"
SEED_DB_PATH = "/tmp/marmot.db"


@dataclass(frozen=True)
class NodeConfig:
    cluster: Cluster
    node: Node
    state_dir: Path | None = None  # where generated NATS credentials live (spec mode)
    nats_connect: dict = field(default_factory=dict)  # keyword arguments for nats.connect()
    http_host: str | None = None  # None: no /health, /metrics server
    http_port: int = 0
    cleanup: bool = False
    save_snapshot: bool = False
    use_inotify: bool = True
    # The operator's explicit consent to run on a database another node id owned (see
    # replication/capture_install.py NodeIdChangeError); without it such a start is refused.
    allow_node_id_change: bool = False

    @property
    def db_path(self) -> Path:
        return Path(self.node.db)


def split_nats_urls(text: str) -> tuple[str, ...]:
    """The seed's comma-separated --nats-url, tolerating spaces around commas."""
    urls = tuple(part.strip() for part in text.split(",") if part.strip())
    if not urls:
        raise MarmotError("--nats-url is empty")
    for url in urls:
        if "://" not in url:
            raise MarmotError(f"--nats-url {url!r} is not a URL (expected e.g. nats://127.0.0.1:4222)")
    return urls


def config_from_flags(
    db_path: str,
    node_id: int,
    nats_url: str,
    shards: int = SEED_SHARDS,
    max_log_entries: int = SEED_MAX_LOG_ENTRIES,
    log_replicas: int = SEED_LOG_REPLICAS,
    subject_prefix: str = SEED_SUBJECT_PREFIX,
    stream_prefix: str = SEED_STREAM_PREFIX,
    seq_map_path: str | None = None,
    enable_snapshot: bool = True,
    cleanup: bool = False,
    save_snapshot: bool = False,
    metrics_host: str = "127.0.0.1",
    metrics_port: int | None = None,
    poll_interval_ms: int | None = None,
    use_inotify: bool = True,
) -> NodeConfig:
    """A one-node cluster model from the seed's flags (external NATS, no generated auth)."""
    problems = []
    if node_id < 1:
        problems.append(f"--node-id must be a positive integer, got {node_id}")
    if shards < 1:
        problems.append(f"--shards must be >= 1, got {shards}")
    if max_log_entries < 1:
        problems.append(f"--max-log-entries must be >= 1, got {max_log_entries}")
    if log_replicas < 1 or log_replicas > 5:
        problems.append(f"--log-replicas must be between 1 and 5, got {log_replicas}")
    for flag, value in (("--subject-prefix", subject_prefix), ("--stream-prefix", stream_prefix)):
        if not value or any(c in value for c in " .*>\t\r\n/\\"):
            problems.append(f"{flag} {value!r} must be non-empty without spaces, '.', '*', '>' or slashes")
    if problems:
        raise MarmotError("; ".join(problems))
    urls = split_nats_urls(nats_url)
    db = str(Path(db_path).expanduser().resolve())
    node = Node(
        name=f"node-{node_id}",
        id=node_id,
        host="127.0.0.1",
        advertise="127.0.0.1",
        db=db,
        seq_map_path=seq_map_path,
        ports=NodePorts(metrics=metrics_port or 0),
    )
    replication = ReplicationSettings(
        shards=shards,
        log_replicas=log_replicas,
        max_log_entries=max_log_entries,
        subject_prefix=subject_prefix,
        stream_prefix=stream_prefix,
    )
    if poll_interval_ms is not None:
        replication = replace(replication, poll_interval_ms=poll_interval_ms)
    cluster = Cluster(
        name="marmot",
        nodes=(node,),
        nodes_known=False,
        nats=NatsSettings(embedded=False, urls=urls, auth=NatsAuth(mode="none")),
        replication=replication,
        # Marmot saved near every max-log-entries/shards entries; ours counts across shards,
        # and must stay below the retention so a snapshot always reaches the oldest kept entry
        # (the rule `validate` enforces for specs).
        snapshots=SnapshotSettings(enabled=enable_snapshot, every_entries=max(1, max_log_entries // 2)),
    )
    return NodeConfig(
        cluster=cluster,
        node=node,
        nats_connect={"servers": list(urls), "name": f"marmot-node-{node_id}"},
        http_host=metrics_host if metrics_port is not None else None,
        http_port=metrics_port or 0,
        cleanup=cleanup,
        save_snapshot=save_snapshot,
        use_inotify=use_inotify,
    )


def config_from_spec(
    cluster: Cluster,
    node_name: str,
    state_dir: Path | None = None,
    cleanup: bool = False,
    save_snapshot: bool = False,
    enable_snapshot: bool | None = None,
    seq_map_path: str | None = None,
) -> NodeConfig:
    """The named node of a loaded, validated spec. Credentials are read here (not logged)."""
    from marmot_appliance.nats_client import connect_kwargs, default_state_dir

    try:
        node = cluster.node(node_name)
    except KeyError:
        names = ", ".join(n.name for n in cluster.nodes)
        raise MarmotError(f"node {node_name!r} is not in the spec (nodes: {names})") from None
    if seq_map_path:
        node = replace(node, seq_map_path=seq_map_path)
    if enable_snapshot is not None:
        cluster = replace(cluster, snapshots=replace(cluster.snapshots, enabled=enable_snapshot))
    state = state_dir or default_state_dir(cluster)
    kwargs = {} if cleanup else connect_kwargs(cluster, node, state)
    return NodeConfig(
        cluster=cluster,
        node=node,
        state_dir=state,
        nats_connect=kwargs,
        http_host=cluster.observability.listen_address,
        http_port=node.ports.metrics,
        cleanup=cleanup,
        save_snapshot=save_snapshot,
    )
