"""NATS credentials for the embedded servers: generated, read from files, or none.

Generated credentials are a random password (`secrets`) for the spec's auth user, kept in
`<state_dir>/secrets/nats-credentials.json` (file 0600, directory 0700) in the shape
`nats_client.read_generated_credentials` reads, so node runtimes, `status` and `snapshot`
connect with them. They are created once and reused, so a second apply changes nothing.

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
from marmot_appliance.nats_client import CREDENTIALS_FILE, read_generated_credentials
from marmot_appliance.natsd.from_spec import ServerCredentials
from marmot_appliance.spec.model import Cluster

PASSWORD_BYTES = 32  # token_urlsafe: [A-Za-z0-9_-], safe inside route URLs without escaping


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
    _write(path, ROUTE_USER, password)
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


def ensure_generated_credentials(state: StateDir, user: str) -> ServerCredentials:
    """Read the generated credentials, creating them on first use; tighten loose modes."""
    path = credentials_path(state)
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, 0o600)  # someone loosened it: secrets are for the owner only
        stored_user, password = read_generated_credentials(state.root)
        if stored_user != user:
            # The spec renamed the auth user: keep the password, rewrite the file.
            _write(path, user, password)
        return ServerCredentials(user=user, password=password)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    _write(path, user, password)
    return ServerCredentials(user=user, password=password)


def _write(path: Path, user: str, password: str) -> None:
    write_private_file(path, json.dumps({"user": user, "password": password}) + "\n", mode=0o600)


def existing_credentials(cluster: Cluster, state: StateDir) -> ServerCredentials | None:
    """Credentials as they are now, without creating anything (for `plan`).

    None when a secret apply would generate does not exist yet (every server is then new anyway).
    """
    route = existing_route_credentials(state)
    if route is None:
        return None
    auth = cluster.nats.auth
    if auth.mode == "generated":
        if not credentials_path(state).exists():
            return None
        user, password = read_generated_credentials(state.root)
        client = ServerCredentials(user=auth.user, password=password)
    else:
        client = credentials_from_spec(cluster) or ServerCredentials()
    return dataclasses.replace(client, route_user=route[0], route_password=route[1])


def credentials_for_apply(cluster: Cluster, state: StateDir) -> ServerCredentials:
    """Credentials the servers are configured with, generating what the spec asks for and
    the route secret (always)."""
    if cluster.nats.auth.mode == "generated":
        client = ensure_generated_credentials(state, cluster.nats.auth.user)
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
