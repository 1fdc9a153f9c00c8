"""How a node (or any CLI command) connects to the cluster's NATS servers.

One place decides servers, credentials and TLS for a spec node, so the node runtime, `status`,
`snapshot` and `watch` connect the same way. Generated credentials live in the state directory
(written by the local appliance with mode 0600; by the Ansible role on remote hosts).
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

from marmot_appliance.errors import MarmotError
from marmot_appliance.spec.model import Cluster, Node

# Generated identities (auth mode `generated`), one per node plus the read-only reader:
#   {"nodes": {"<node>": {"user": ..., "password": ...}, ...}, "reader": {"user": ..., "password": ...}}
# A remote host's copy holds only its own node's entry.
CREDENTIALS_FILE = "secrets/nats-credentials.json"
# The reader identity written out for the operator (watch, feed readers): {"user", "password"}.
READER_CREDENTIALS_FILE = "secrets/nats-reader.json"


def default_state_dir(cluster: Cluster) -> Path:
    if cluster.deploy.state_dir:
        return Path(cluster.deploy.state_dir)
    base = cluster.source.parent if cluster.source else Path.cwd()
    return base / ".marmot-appliance" / cluster.name


def server_urls(cluster: Cluster, node: Node | None = None) -> list[str]:
    """Client URLs, the node's own embedded server first."""
    if not cluster.nats.embedded:
        return list(cluster.nats.urls)
    scheme = "tls" if cluster.nats.tls else "nats"
    ordered = sorted(cluster.nodes, key=lambda n: (node is None or n.name != node.name, n.id))
    return [f"{scheme}://{n.advertise}:{n.ports.client}" for n in ordered]


def read_generated_credentials(state_dir: Path, node_name: str | None) -> tuple[str, str]:
    """(user, password) of the node's own identity, or of the reader when `node_name` is None."""
    path = state_dir / CREDENTIALS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise MarmotError(
            f"generated NATS credentials not found at {path}; run `marmot-appliance apply` first"
        ) from exc
    except (OSError, ValueError) as exc:
        raise MarmotError(f"generated NATS credentials at {path} are unreadable: {exc}") from exc
    try:
        entry = data["reader"] if node_name is None else data["nodes"][node_name]
        return str(entry["user"]), str(entry["password"])
    except (KeyError, TypeError) as exc:
        who = "the reader" if node_name is None else f"node {node_name}"
        raise MarmotError(
            f"generated NATS credentials at {path} hold no identity for {who}; run `marmot-appliance apply`"
        ) from exc


def connect_kwargs(
    cluster: Cluster, node: Node | None, state_dir: Path | None = None, as_reader: bool = False
) -> dict:
    """Keyword arguments for `nats.connect()`. Secrets are read here and never logged.

    With generated auth a node connects as its own identity; without a node, or with
    `as_reader` (watch, feed readers: `node` then only orders the servers), as the read-only
    reader identity."""
    kwargs: dict = {
        "servers": server_urls(cluster, node),
        "connect_timeout": cluster.nats.connect_timeout_s,
        "name": f"marmot-{cluster.name}-{node.name}" if node else f"marmot-{cluster.name}",
        # Keep the order of `servers`: a node talks to its own embedded server first, so a
        # partition elsewhere never cuts a healthy node off (nats-py shuffles by default).
        "dont_randomize": True,
        # A server that vanished without closing the TCP connection (a cut link) is noticed
        # within ~15 s instead of nats-py's default of several minutes, then the client
        # reconnects to another server.
        "ping_interval": 5,
        "max_outstanding_pings": 3,
    }
    auth = cluster.nats.auth
    if auth.mode == "generated":
        user, password = read_generated_credentials(
            state_dir or default_state_dir(cluster), None if as_reader or node is None else node.name
        )
        kwargs.update(user=user, password=password)
    elif auth.mode == "user":
        if not auth.password_file:
            raise MarmotError("nats.auth.mode is 'user' but nats.auth.password_file is not set")
        kwargs.update(user=auth.user, password=Path(auth.password_file).read_text().strip())
    elif auth.mode == "nkey":
        if not auth.nkey_seed_file:
            raise MarmotError("nats.auth.mode is 'nkey' but nats.auth.nkey_seed_file is not set")
        kwargs.update(nkeys_seed=auth.nkey_seed_file)
    tls = cluster.nats.tls
    if tls:
        context = ssl.create_default_context(cafile=tls.ca) if tls.ca else ssl.create_default_context()
        if tls.verify_clients:
            # The servers demand a client certificate: present the node's own (cert + key).
            try:
                context.load_cert_chain(tls.cert, tls.key)
            except (OSError, ssl.SSLError) as exc:
                raise MarmotError(f"cannot load the client certificate {tls.cert} / {tls.key}: {exc}") from exc
        kwargs["tls"] = context
    return kwargs
