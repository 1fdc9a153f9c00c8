"""How a node (or any CLI command) connects to the cluster's NATS servers.

One place decides servers, credentials and TLS for a spec node, so the node runtime, `status`,
`snapshot` and `watch` connect the same way. Generated credentials live in the state directory
(written by the local appliance with mode 0600; by the Ansible role on remote hosts).

One place also opens the connection for every command (`snapshot`, `verify`, `repair`, `watch`
and the change feed): a bounded first attempt over the servers, and one message when it fails,
naming the servers (never a password from a URL) and the cause in words
(`NatsConnectError`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

from marmot_appliance.errors import MarmotError
from marmot_appliance.spec.model import Cluster, Node

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT_S = 10.0
# A command tries each server twice, this far apart, then gives up with the last cause.
COMMAND_RETRY_WAIT_S = 0.5

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


class NatsConnectError(MarmotError):
    """No server accepted the connection; the message names the servers and why."""


def shown_servers(servers: Any) -> str:
    """The server URLs for a message or a log: any user:password@ part is left out."""
    urls = [servers] if isinstance(servers, str) else list(servers or [])
    shown = []
    for url in urls:
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            host = f"[{host}]" if ":" in host else host
            shown.append(f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}" if parts.scheme else url)
        except ValueError:
            shown.append("(an unparsable URL)")
    return ", ".join(shown) or "(no servers)"


def failure_reason(exc: BaseException, connect_timeout_s: float | None = None) -> str:
    """Why a connection attempt failed, in words an operator can act on."""
    import nats.errors

    text = str(exc)
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "connection refused (nothing listens there: is nats-server running, and is the port right?)"
    if _is_authorization(exc):
        return "authorization violation (the server refused these credentials: user/password, nkey or token)"
    if isinstance(exc, (asyncio.TimeoutError, nats.errors.TimeoutError)):
        within = f" within {connect_timeout_s:g}s" if connect_timeout_s else ""
        return f"no answer{within}"
    return text or type(exc).__name__


def _is_authorization(exc: BaseException) -> bool:
    import nats.errors

    return isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower()


async def open_connection(options: dict, *, long_lived: bool = False):
    """Connect with `options` (keyword arguments of `nats.connect()`, e.g. from connect_kwargs).

    A command (`long_lived` False) tries each server twice and gives up: a typo'd port fails in
    a second, not after nats-py's minutes of retries. A long-lived client (the change feed)
    keeps the given reconnect settings for later, but its first connection too is bounded, to
    about one round over the servers. Raises NatsConnectError."""
    import nats
    import nats.errors

    options = dict(options)
    options.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)
    servers = options.get("servers") or []
    servers = [servers] if isinstance(servers, str) else list(servers)
    timeout = float(options["connect_timeout"])
    if long_lived:
        deadline = timeout * max(1, len(servers)) + 1.0
    else:
        # allow_reconnect=False would try the first server only; one retry each over all of them.
        options.update(allow_reconnect=True, max_reconnect_attempts=1, reconnect_time_wait=COMMAND_RETRY_WAIT_S)
        deadline = (timeout + COMMAND_RETRY_WAIT_S) * 2 * max(1, len(servers)) + 1.0
    failures: list[BaseException] = []  # the latest (bounded for long-lived connections)
    refused: list[BaseException] = []  # an authorization failure: the retry's reset says less
    caller_error_cb = options.get("error_cb")

    async def remember_error(exc: BaseException) -> None:
        # One message instead of nats-py's traceback per failed attempt.
        failures[:] = [exc]
        if _is_authorization(exc):
            refused[:] = [exc]
        if caller_error_cb is not None:
            await caller_error_cb(exc)
        else:
            log.debug("nats: %s", exc)

    options["error_cb"] = remember_error
    try:
        return await asyncio.wait_for(nats.connect(**options), timeout=deadline)
    except (nats.errors.Error, OSError, asyncio.TimeoutError) as exc:
        cause = (refused or failures or [exc])[-1]
        raise NatsConnectError(
            f"cannot connect to NATS at {shown_servers(servers)}: {failure_reason(cause, timeout)}"
        ) from exc


def quiet_client_task_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The loop's exception handler for commands: an error left in one of nats-py's own
    background tasks (e.g. its reconnect task after the servers went away while the command
    closed its connection) is logged at debug level instead of printed as a traceback; anything
    else goes to asyncio's default handler. The command has already reported what failed."""
    task = context.get("future") or context.get("task")
    get_coro = getattr(task, "get_coro", None)
    code = getattr(get_coro() if get_coro else None, "cr_code", None)
    if code is not None and f"{os.sep}nats{os.sep}" in code.co_filename:
        log.debug("nats client task %s: %s", code.co_name, context.get("exception") or context.get("message"))
        return
    loop.default_exception_handler(context)


async def with_connection(options: dict, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(nc)` on a command's connection, then close it. A NATS request that fails
    becomes a MarmotError (one message at the CLI's edge, no traceback)."""
    import nats.errors

    asyncio.get_running_loop().set_exception_handler(quiet_client_task_errors)
    nc = await open_connection(options)
    try:
        return await work(nc)
    except (nats.errors.Error, asyncio.TimeoutError) as exc:
        raise MarmotError(f"NATS request failed: {exc!r}") from exc
    finally:
        await nc.close()
