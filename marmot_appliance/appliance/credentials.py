"""NATS credentials for the embedded servers: generated, read from files, or none.

Generated credentials are one identity per node (`<auth user>-<node>`) plus a read-only reader
(`<auth user>-reader`), each a random password (`secrets`), kept in
`<state_dir>/secrets/nats-credentials.json` (file 0600, directory 0700) in the shape
`nats_client.read_generated_credentials` reads: node runtimes and `snapshot` connect as their
node, `watch` and feed readers as the reader (also written alone to `secrets/nats-reader.json`
for the operator). What each identity may do is in natsd/permissions.py. They are created once
and reused, so a second apply changes nothing.

The route secret (`secrets/nats-route.json`) is generated the same way in every auth mode, `none`
included: routes never accept the clients' credential, and only server configs carry it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path

from marmot_appliance.appliance.errors import ApplianceError
from marmot_appliance.appliance.state import StateDir, write_private_file
from marmot_appliance.nats_client import CREDENTIALS_FILE, READER_CREDENTIALS_FILE
from marmot_appliance.natsd.from_spec import Identity, ServerCredentials
from marmot_appliance.spec.model import Cluster

PASSWORD_BYTES = 32  # token_urlsafe: [A-Za-z0-9_-], safe inside route URLs without escaping
READER_SUFFIX = "reader"  # the reader's user is "<nats.auth.user>-reader"


ROUTE_CREDENTIALS_FILE = "secrets/nats-route.json"  # {"user": ..., "password": ...}
ROUTE_USER = "marmot-route"


def credentials_path(state: StateDir) -> Path:
    return state.root / CREDENTIALS_FILE


def route_credentials_path(state: StateDir) -> Path:
    return state.root / ROUTE_CREDENTIALS_FILE


def ensure_route_credentials(state: StateDir) -> tuple[str, str]:
    """The route secret (created on first use, in every auth mode): only servers hold it."""
    path = route_credentials_path(state)
    existing = existing_route_credentials(state)
    if existing is not None:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return existing
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    write_private_file(path, json.dumps({"user": ROUTE_USER, "password": password}) + "\n", mode=0o600)
    return ROUTE_USER, password


def existing_route_credentials(state: StateDir) -> tuple[str, str] | None:
    path = route_credentials_path(state)
    try:
        data = json.loads(path.read_text())
        return str(data["user"]), str(data["password"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ApplianceError(f"route credentials at {path} are unreadable: {exc}") from exc


def ensure_generated_credentials(state: StateDir, cluster: Cluster) -> ServerCredentials:
    """The generated identities (one per node, plus the reader), creating what is missing:
    a node added to the spec gets its own, a removed node's is dropped (the servers then refuse
    it). Existing passwords are kept, so a second apply changes nothing. Also writes the
    reader's credentials for the operator (`secrets/nats-reader.json`, 0600)."""
    path = credentials_path(state)
    stored = _stored_identities(path)
    prefix = cluster.nats.auth.user
    wanted: dict[str, dict] = {}
    for node in cluster.nodes:
        entry = stored.get("nodes", {}).get(node.name)
        user = f"{prefix}-{node.name}"
        if not entry or entry.get("user") != user:
            entry = {"user": user, "password": secrets.token_urlsafe(PASSWORD_BYTES)}
        wanted[node.name] = entry
    reader = stored.get("reader")
    if not reader or reader.get("user") != f"{prefix}-{READER_SUFFIX}":
        reader = {"user": f"{prefix}-{READER_SUFFIX}", "password": secrets.token_urlsafe(PASSWORD_BYTES)}
    document = {"nodes": wanted, "reader": reader}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if document != stored:
        write_private_file(path, json.dumps(document, indent=2) + "\n", mode=0o600)
    elif path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)  # someone loosened it: secrets are for the owner only
    reader_path = state.root / READER_CREDENTIALS_FILE
    reader_text = json.dumps({"user": reader["user"], "password": reader["password"]}) + "\n"
    if not reader_path.exists() or reader_path.read_text() != reader_text:
        write_private_file(reader_path, reader_text, mode=0o600)
    elif reader_path.stat().st_mode & 0o077:
        os.chmod(reader_path, 0o600)
    return _credentials_of(document)


def _stored_identities(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ApplianceError(f"generated NATS credentials at {path} are unreadable: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        return {}  # the single shared identity of earlier versions: replaced by per-node ones
    return data


def _credentials_of(document: dict) -> ServerCredentials:
    identities = [
        Identity(user=entry["user"], password=entry["password"], node=name) for name, entry in document["nodes"].items()
    ]
    identities.append(Identity(user=document["reader"]["user"], password=document["reader"]["password"]))
    return ServerCredentials(identities=tuple(identities))


def node_credentials_document(credentials: ServerCredentials, node_name: str) -> dict:
    """What a remote host's secrets/nats-credentials.json holds: its own node's identity only."""
    for identity in credentials.identities:
        if identity.node == node_name:
            return {"nodes": {node_name: {"user": identity.user, "password": identity.password}}}
    raise ApplianceError(f"no generated identity for node {node_name}")


def existing_credentials(cluster: Cluster, state: StateDir) -> ServerCredentials | None:
    """Credentials as they are now, without creating anything (for `plan`).

    None when a secret apply would generate does not exist yet (every server is then new anyway).
    """
    route = existing_route_credentials(state)
    if route is None:
        return None
    auth = cluster.nats.auth
    if auth.mode == "generated":
        stored = _stored_identities(credentials_path(state))
        if not stored or any(n.name not in stored["nodes"] for n in cluster.nodes) or "reader" not in stored:
            return None
        client = _credentials_of({"nodes": {n.name: stored["nodes"][n.name] for n in cluster.nodes},
                                  "reader": stored["reader"]})
    else:
        client = credentials_from_spec(cluster) or ServerCredentials()
    return dataclasses.replace(client, route_user=route[0], route_password=route[1])


def credentials_for_apply(cluster: Cluster, state: StateDir) -> ServerCredentials:
    """Credentials the servers are configured with, generating what the spec asks for and
    the route secret (always)."""
    if cluster.nats.auth.mode == "generated":
        client = ensure_generated_credentials(state, cluster)
    else:
        client = credentials_from_spec(cluster) or ServerCredentials()
    route_user, route_password = ensure_route_credentials(state)
    return dataclasses.replace(client, route_user=route_user, route_password=route_password)


def credentials_from_spec(cluster: Cluster) -> ServerCredentials | None:
    """`user` / `nkey` modes: secrets come from files the spec names; `none`: no credentials."""
    auth = cluster.nats.auth
    if auth.mode == "none":
        return None
    if auth.mode == "user":
        if not auth.password_file:
            raise ApplianceError("nats.auth.mode is 'user' but nats.auth.password_file is not set")
        password = _read_secret_file(auth.password_file, "nats.auth.password_file")
        return ServerCredentials(user=auth.user, password=password)
    if auth.mode == "nkey":
        if not auth.nkey_seed_file:
            raise ApplianceError("nats.auth.mode is 'nkey' but nats.auth.nkey_seed_file is not set")
        seed = _read_secret_file(auth.nkey_seed_file, "nats.auth.nkey_seed_file")
        return ServerCredentials(nkey=_public_nkey(seed))
    raise ApplianceError(f"unknown nats.auth.mode {auth.mode!r}")


def _read_secret_file(path: str, what: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise ApplianceError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if not value:
        raise ApplianceError(f"{what} {path} is empty")
    return value


def _public_nkey(seed: str) -> str:
    try:
        import nkeys  # the optional `nkeys` extra
    except ImportError as exc:
        raise ApplianceError(
            "nats.auth.mode 'nkey' needs the nkeys package: pip install 'marmot-appliance[nkeys]'"
        ) from exc
    try:
        return nkeys.from_seed(seed.encode()).public_key.decode()
    except Exception as exc:  # nkeys raises its own error types for malformed seeds
        raise ApplianceError("nats.auth.nkey_seed_file does not hold a valid nkey seed") from exc
