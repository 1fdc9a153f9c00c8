"""Render nats-server configuration files.

`ServerConfig` is the plain description of one server; `render_server_config` turns it into the
nats-server config language. The spec-to-ServerConfig mapping (embedded servers of a cluster
spec) lives in `marmot_appliance.natsd.from_spec`, so the local appliance, the Ansible role and
the test harness all render through this one function.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from marmot_appliance.errors import NatsServerError
from marmot_appliance.natsd.binary import nats_server_path


@dataclass(frozen=True)
class ClientUser:
    """One client identity the server accepts: user + password, or a public nkey; with
    `publish_allow` set, it may publish only on those subjects (see natsd/permissions.py)."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    nkey: str | None = None
    publish_allow: tuple[str, ...] | None = None
    allow_responses: bool = False  # may answer requests it received (once each), nothing more


@dataclass(frozen=True)
class ServerConfig:
    server_name: str
    host: str  # listen address for client and cluster ports
    client_port: int
    monitor_port: int
    store_dir: str
    cluster_name: str | None = None  # None: a single server, no clustering
    cluster_port: int | None = None
    routes: tuple[str, ...] = ()  # "host:port" of every other server's cluster port
    advertise: str | None = None  # address advertised to clients and routes
    max_memory: str = "256MB"
    max_file: str = "10GB"
    # Fewer, larger messages: rows above max_payload travel as fragments (docs/wire-format.md,
    # "Large rows"), so any size works; 8 MB is the largest nats-server accepts without warning.
    max_payload: str = "8MB"
    monitor_host: str | None = None  # None: same as host
    user: str | None = None  # client authentication, when set
    password: str | None = field(default=None, repr=False)
    nkey: str | None = None  # public nkey of the allowed client user
    users: tuple[ClientUser, ...] = ()  # identities with permissions (instead of user/nkey)
    # Routes authenticate with their own secret, never the clients': a client credential
    # (held by every node, reader and operator) must not let a server join the cluster.
    route_user: str | None = None
    route_password: str | None = field(default=None, repr=False)
    tls_cert: str | None = None  # with a cluster, also mutual TLS on routes
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_verify_clients: bool = False  # clients must present a certificate (mTLS)
    extra: dict = field(default_factory=dict)


def _q(value: str) -> str:
    """Quote a string for the nats config language (JSON string syntax is accepted)."""
    return json.dumps(value)


def render_server_config(cfg: ServerConfig) -> str:
    lines = [
        "# Rendered by marmot-appliance; edits are overwritten.",
        f"server_name: {_q(cfg.server_name)}",
        f"listen: {_q(f'{cfg.host}:{cfg.client_port}')}",
        f"http: {_q(f'{cfg.monitor_host or cfg.host}:{cfg.monitor_port}')}",
        f"max_payload: {cfg.max_payload}",
    ]
    if cfg.advertise:
        lines.append(f"client_advertise: {_q(f'{cfg.advertise}:{cfg.client_port}')}")
    lines += [
        "jetstream {",
        f"  store_dir: {_q(cfg.store_dir)}",
        f"  max_memory_store: {cfg.max_memory}",
        f"  max_file_store: {cfg.max_file}",
        "}",
    ]
    if cfg.users:
        lines += ["authorization {", "  users: [", *(_user_line(u) for u in cfg.users), "  ]", "}"]
    elif cfg.user and cfg.password:
        lines += ["authorization {", f"  user: {_q(cfg.user)}", f"  password: {_q(cfg.password)}", "}"]
    elif cfg.nkey:
        lines += ["authorization {", f"  users: [ {{ nkey: {_q(cfg.nkey)} }} ]", "}"]
    if cfg.tls_cert and cfg.tls_key:
        lines += ["tls {", *_tls_lines(cfg.tls_cert, cfg.tls_key, cfg.tls_ca, "  ", verify=cfg.tls_verify_clients), "}"]
    if cfg.cluster_name and cfg.cluster_port:
        lines += _cluster_lines(cfg, cfg.cluster_name)
    for key, value in cfg.extra.items():
        lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _user_line(user: ClientUser) -> str:
    entry: dict = {"nkey": user.nkey} if user.nkey else {"user": user.user, "password": user.password}
    if user.publish_allow is not None:
        # Subscriptions stay open; publishing is allow-listed (what is not listed is refused).
        entry["permissions"] = {"publish": {"allow": list(user.publish_allow)}}
        if user.allow_responses:
            entry["permissions"]["allow_responses"] = True
    return f"    {json.dumps(entry)}"


def _tls_lines(cert: str, key: str, ca: str | None, indent: str, verify: bool) -> list[str]:
    lines = [f"{indent}cert_file: {_q(cert)}", f"{indent}key_file: {_q(key)}"]
    if ca:
        lines.append(f"{indent}ca_file: {_q(ca)}")
    if verify:
        lines.append(f"{indent}verify: true")
    return lines


def _cluster_lines(cfg: ServerConfig, name: str) -> list[str]:
    """The cluster block: routes authenticated with the route secret and, with TLS, mutual TLS
    (each server verifies the other's certificate), so an unknown server cannot join."""
    route_auth = ""
    if cfg.route_user and cfg.route_password:
        route_auth = f"{cfg.route_user}:{cfg.route_password}@"
    routes = ", ".join(_q(f"nats-route://{route_auth}{r}") for r in cfg.routes)
    lines = [
        "cluster {",
        f"  name: {_q(name)}",
        f"  listen: {_q(f'{cfg.host}:{cfg.cluster_port}')}",
    ]
    if cfg.advertise:
        lines.append(f"  advertise: {_q(f'{cfg.advertise}:{cfg.cluster_port}')}")
    if cfg.route_user and cfg.route_password:
        lines += [
            "  authorization {",
            f"    user: {_q(cfg.route_user)}",
            f"    password: {_q(cfg.route_password)}",
            "  }",
        ]
    if cfg.tls_cert and cfg.tls_key:
        lines += ["  tls {", *_tls_lines(cfg.tls_cert, cfg.tls_key, cfg.tls_ca, "    ", verify=True), "  }"]
    lines += [f"  routes: [{routes}]", "}"]
    return lines


def check_config_file(path: Path, timeout_s: float = 30.0) -> None:
    """Ask nats-server itself whether the file is valid (`nats-server -t -c FILE`)."""
    try:
        result = subprocess.run(
            [str(nats_server_path()), "-t", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        raise NatsServerError(f"nats-server -t timed out checking {path}") from exc
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise NatsServerError(f"nats-server rejected {path}: {detail}")
