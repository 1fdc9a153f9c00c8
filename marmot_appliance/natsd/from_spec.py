"""Map a cluster spec onto embedded nats-server configurations.

`server_config_for` is a pure function (no file or network access) so the local appliance, the
Ansible role and tests render the same configuration for the same spec. Secrets arrive through
`ServerCredentials`; reading or generating them is the caller's job
(`marmot_appliance.appliance.credentials` locally, the Ansible role remotely).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from marmot_appliance.errors import MarmotError
from marmot_appliance.natsd.config import ClientUser, ServerConfig
from marmot_appliance.natsd.permissions import node_publish_allow, reader_publish_allow, verify_requests
from marmot_appliance.spec.model import Cluster, Node


@dataclass(frozen=True)
class Identity:
    """One generated client identity: a node's own (node set) or the read-only reader."""

    user: str
    password: str = field(repr=False)
    node: str | None = None  # None: the reader


@dataclass(frozen=True)
class ServerCredentials:
    """What a server accepts from clients and other servers' routes.

    `generated` auth: `identities`, one per node plus the reader. `user` auth: user + password,
    `nkey` auth: nkey (the *public* key) — one identity shared by every node and reader.
    Passwords are excluded from repr so they never land in a log line or traceback.
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    nkey: str | None = None
    identities: tuple[Identity, ...] = ()
    # The route secret: only servers hold it (never a node runtime, reader or operator tool).
    route_user: str | None = None
    route_password: str | None = field(default=None, repr=False)


def monitor_host(cluster: Cluster, node: Node) -> str:
    """Address the server's HTTP monitor binds to: `nats.monitor_address` (loopback by default).

    The monitor is plain HTTP without authentication and lists every connection (/connz), so it
    does not follow the node's network address unless the spec asks for it."""
    return cluster.nats.monitor_address


def monitor_probe_host(cluster: Cluster, node: Node) -> str:
    """Where a process on the server's own host reaches its monitor (a wildcard bind is
    reached over loopback)."""
    address = monitor_host(cluster, node)
    return "127.0.0.1" if address in ("0.0.0.0", "::", "[::]") else address


def listen_host(node: Node) -> str:
    """Address the node's server binds to.

    Local nodes bind their loopback address (several servers share one machine, told apart by
    port). Remote servers bind the advertised address, so they are reachable by the other hosts
    but not on every interface of a multi-homed machine.
    """
    return node.host if node.is_local else node.advertise


def server_config_for(
    cluster: Cluster,
    node: Node,
    store_dir: str,
    credentials: ServerCredentials | None,
) -> ServerConfig:
    """The embedded nats-server of `node`: routes to every other node's cluster port.

    `credentials` is required unless the spec sets `nats.auth.mode: none`; it is ignored then.
    """
    if not cluster.nats.embedded:
        raise MarmotError("nats.embedded is false: the spec describes no nats-server to configure")
    if node not in cluster.nodes:
        raise MarmotError(f"node {node.name!r} is not part of cluster {cluster.name!r}")
    clustered = len(cluster.nodes) > 1
    if clustered and not (credentials and credentials.route_user and credentials.route_password):
        # Routes are authenticated in every auth mode, `none` included.
        raise MarmotError("no route credentials were provided for a clustered nats-server")
    users = client_users(cluster, credentials)
    routes = tuple(
        f"{other.advertise}:{other.ports.cluster}"
        for other in sorted(cluster.nodes, key=lambda n: n.id)
        if other.name != node.name
    )
    tls = cluster.nats.tls
    return ServerConfig(
        server_name=f"{cluster.name}-{node.name}",
        host=listen_host(node),
        client_port=node.ports.client,
        monitor_port=node.ports.monitor,
        store_dir=store_dir,
        # A lone server runs JetStream standalone: a cluster block without peers would wait
        # forever for a meta-group quorum.
        cluster_name=cluster.name if clustered else None,
        cluster_port=node.ports.cluster if clustered else None,
        routes=routes if clustered else (),
        advertise=node.advertise,
        max_memory=cluster.nats.jetstream.max_memory,
        max_file=cluster.nats.jetstream.max_file,
        users=users,
        # (clustered implies credentials: checked above)
        route_user=credentials.route_user if clustered and credentials is not None else None,
        route_password=credentials.route_password if clustered and credentials is not None else None,
        monitor_host=monitor_host(cluster, node),
        tls_cert=tls.cert if tls else None,
        tls_key=tls.key if tls else None,
        tls_ca=tls.ca if tls else None,
        tls_verify_clients=tls.verify_clients if tls else False,
    )


def client_users(cluster: Cluster, credentials: ServerCredentials | None) -> tuple[ClientUser, ...]:
    """The client identities a server of this cluster accepts, each with its permissions."""
    auth = cluster.nats.auth
    if auth.mode == "none":
        return ()
    if credentials is None:
        raise MarmotError(f"nats.auth.mode is {auth.mode!r} but no credentials were provided")
    every_origin = sorted(n.id for n in cluster.nodes)
    if auth.mode == "nkey":
        if not credentials.nkey:
            raise MarmotError("nats.auth.mode is 'nkey' but no public nkey was provided")
        # One identity for every node and reader: it may publish as any node (docs/security.md).
        return (
            ClientUser(
                nkey=credentials.nkey,
                publish_allow=tuple(node_publish_allow(cluster, every_origin) + verify_requests(cluster)),
                allow_responses=True,
            ),
        )
    if auth.mode == "user":
        if not (credentials.user and credentials.password):
            raise MarmotError("nats.auth.mode is 'user' but user or password is empty")
        shared = ClientUser(
            user=credentials.user,
            password=credentials.password,
            publish_allow=tuple(node_publish_allow(cluster, every_origin) + verify_requests(cluster)),
            allow_responses=True,
        )
        return (shared,)
    by_node = {identity.node: identity for identity in credentials.identities}
    missing = [n.name for n in cluster.nodes if n.name not in by_node]
    if missing or None not in by_node:
        who = ", ".join(missing) if missing else "the reader"
        raise MarmotError(f"nats.auth.mode is 'generated' but no identity was provided for {who}")
    users = [
        ClientUser(
            user=by_node[n.name].user,
            password=by_node[n.name].password,
            # verify requests too: the continuous convergence check runs on every node.
            publish_allow=tuple(node_publish_allow(cluster, [n.id]) + verify_requests(cluster)),
            allow_responses=True,  # answers verify requests
        )
        for n in sorted(cluster.nodes, key=lambda n: n.id)
    ]
    reader = by_node[None]
    users.append(ClientUser(user=reader.user, password=reader.password, publish_allow=tuple(reader_publish_allow(cluster))))
    return tuple(users)


def monitor_endpoints(cluster: Cluster) -> list[tuple[str, int]]:
    """(host, monitor port) of every embedded server, for waiting on the JetStream meta leader."""
    return [(monitor_probe_host(cluster, n), n.ports.monitor) for n in cluster.nodes]
