"""Checks the schema cannot express: uniqueness, address/port clashes, replica counts, paths.

They run on the raw document alongside schema validation, so one `validate` run reports every
mistake at once. Values of the wrong type are skipped here (the schema already reports them).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from .model import NatsSettings, ObservabilitySettings, ReplicationSettings, SnapshotSettings
from .problems import JsonPath, Problem
from .yaml_source import SourceDocument

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_JETSTREAM_REPLICAS = 5


def _section(data: Any, key: str) -> dict[str, Any]:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


def _int(section: dict[str, Any], key: str) -> int | None:
    value = section.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(section: dict[str, Any], key: str) -> str | None:
    value = section.get(key)
    return value if isinstance(value, str) else None


def _nodes(data: Any) -> list[tuple[int, dict[str, Any]]]:
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, list):
        return []
    return [(index, node) for index, node in enumerate(nodes) if isinstance(node, dict)]


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


def _address_key(host: str) -> str:
    return "127.0.0.1" if is_loopback(host) else host.lower()


def is_embedded(data: Any) -> bool:
    embedded = _section(data, "nats").get("embedded", NatsSettings.embedded)
    return embedded if isinstance(embedded, bool) else NatsSettings.embedded


def all_nodes_local(data: Any) -> bool:
    hosts = [_str(node, "host") for _, node in _nodes(data)]
    return bool(hosts) and all(host is not None and is_loopback(host) for host in hosts)


def nats_server_count(data: Any) -> int:
    if is_embedded(data):
        return len(_nodes(data))
    urls = _section(data, "nats").get("urls")
    return len(urls) if isinstance(urls, list) else 0


def effective_node_ports(data: Any, node: dict[str, Any]) -> dict[str, int]:
    """The node's ports after overrides: node ports, else nats/observability-level, else model defaults."""
    nats = _section(data, "nats")
    observability = _section(data, "observability")
    overrides = _section(node, "ports")
    cluster_level = {
        "client": _int(nats, "client_port") or NatsSettings.client_port,
        "cluster": _int(nats, "cluster_port") or NatsSettings.cluster_port,
        "monitor": _int(nats, "monitor_port") or NatsSettings.monitor_port,
        "metrics": _int(observability, "metrics_port") or ObservabilitySettings.metrics_port,
    }
    return {kind: _int(overrides, kind) or default for kind, default in cluster_level.items()}


class _Checker:
    def __init__(self, document: SourceDocument):
        self.document = document
        self.data = document.data
        self.problems: list[Problem] = []

    def report(self, path: JsonPath, message: str) -> None:
        self.problems.append(self.document.problem(path, message))

    def run(self) -> list[Problem]:
        if not isinstance(self.data, dict):
            return []
        self.unique_node_field("name")
        self.unique_node_field("id")
        self.ports_do_not_clash()
        self.loopback_only_in_local_clusters()
        self.replicas_fit_servers()
        self.snapshots_reach_the_log()
        self.nats_mode_is_consistent()
        self.auth_has_its_files()
        self.paths_are_usable()
        self.databases_are_distinct()
        self.tables_not_both_included_and_excluded()
        return self.problems

    def unique_node_field(self, key: str) -> None:
        seen: dict[Any, int] = {}
        for index, node in _nodes(self.data):
            value = node.get(key)
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                continue
            if value in seen:
                self.report(("nodes", index, key), f"duplicate node {key} {value!r} (also nodes[{seen[value]}])")
            else:
                seen[value] = index

    def ports_do_not_clash(self) -> None:
        # With external NATS only the metrics endpoint binds on the node's host.
        kinds = ("client", "cluster", "monitor", "metrics") if is_embedded(self.data) else ("metrics",)
        owners: dict[tuple[str, int], str] = {}
        for index, node in _nodes(self.data):
            name = _str(node, "name") or f"nodes[{index}]"
            host = _str(node, "host")
            advertise = _str(node, "advertise") or host
            addresses = {_address_key(a) for a in (host, advertise) if a}
            ports = effective_node_ports(self.data, node)
            for kind in kinds:
                port = ports[kind]
                for address in sorted(addresses):
                    owner = owners.get((address, port))
                    if owner is not None:
                        path: JsonPath = ("nodes", index, "ports", kind)
                        message = f"port {port} ({kind}) on {address} is already used by {owner}"
                        if _int(_section(node, "ports"), kind) is None:
                            message += f"; nodes sharing a host need their own ports: set nodes[{index}].ports.{kind}"
                        self.report(path, message)
                        break
                for address in addresses:
                    owners.setdefault((address, port), f"node {name} ({kind})")

    def loopback_only_in_local_clusters(self) -> None:
        nodes = _nodes(self.data)
        has_remote = any(_str(node, "host") and not is_loopback(node["host"]) for _, node in nodes)
        if not has_remote:
            return
        for index, node in nodes:
            for key in ("host", "advertise"):
                value = _str(node, key)
                if value is not None and is_loopback(value):
                    self.report(
                        ("nodes", index, key),
                        f"loopback address {value!r} in a cluster with remote nodes; other hosts cannot reach it",
                    )

    def replicas_fit_servers(self) -> None:
        servers = nats_server_count(self.data)
        if servers == 0:
            return
        for section, key in (("replication", "log_replicas"), ("snapshots", "replicas")):
            replicas = _int(_section(self.data, section), key)
            if replicas is not None and replicas > servers:
                self.report(
                    (section, key),
                    f"{replicas} replicas but the cluster has only {servers} NATS server{'s' if servers != 1 else ''}",
                )

    def snapshots_reach_the_log(self) -> None:
        """A node behind a truncated log restores the newest snapshot and replays from its
        positions; if snapshots are taken less often than the log is truncated, no snapshot
        may reach the oldest entry still in the stream and the node cannot catch up."""
        snapshots = _section(self.data, "snapshots")
        if snapshots.get("enabled") is False:
            return
        every = snapshots.get("every_entries", SnapshotSettings.every_entries)
        retained = _int(_section(self.data, "replication"), "max_log_entries") or ReplicationSettings.max_log_entries
        if isinstance(every, int) and not isinstance(every, bool) and every >= retained:
            self.report(
                ("snapshots", "every_entries") if "every_entries" in snapshots else ("replication", "max_log_entries"),
                f"snapshots every {every} entries but the streams keep only {retained}: a node that "
                f"falls behind could find no snapshot reaching the log; set snapshots.every_entries "
                f"below replication.max_log_entries (half of it is a good choice)",
            )

    def nats_mode_is_consistent(self) -> None:
        nats = _section(self.data, "nats")
        urls = nats.get("urls")
        has_urls = isinstance(urls, list) and len(urls) > 0
        if is_embedded(self.data) and has_urls:
            self.report(("nats", "urls"), "urls are only used with embedded: false (an existing NATS cluster)")
        if not is_embedded(self.data) and not has_urls:
            self.report(("nats", "embedded"), "embedded: false needs nats.urls, the client URLs of the existing NATS cluster")

    def auth_has_its_files(self) -> None:
        auth = _section(_section(self.data, "nats"), "auth")
        mode = _str(auth, "mode") or "generated"
        needs = {"user": "password_file", "nkey": "nkey_seed_file"}
        for auth_mode, key in needs.items():
            if mode == auth_mode and not _str(auth, key):
                self.report(("nats", "auth"), f"mode {auth_mode!r} needs {key}")
            if mode != auth_mode and auth.get(key) is not None:
                self.report(("nats", "auth", key), f"{key} is only used with mode {auth_mode!r} (mode is {mode!r})")

    def _cluster_paths(self) -> Iterator[tuple[JsonPath, str]]:
        nats = _section(self.data, "nats")
        candidates: list[tuple[JsonPath, Any]] = [
            (("nats", "jetstream", "store_dir"), _section(nats, "jetstream").get("store_dir")),
        ]
        auth = _section(nats, "auth")
        candidates += [(("nats", "auth", key), auth.get(key)) for key in ("password_file", "nkey_seed_file")]
        tls = _section(nats, "tls")
        candidates += [(("nats", "tls", key), tls.get(key)) for key in ("cert", "key", "ca")]
        for path, value in candidates:
            if isinstance(value, str):
                yield path, value

    def _check_path(self, path: JsonPath, value: str, relative_allowed: bool, why: str) -> None:
        if value.startswith("~"):
            self.report(path, f"{value!r}: '~' is not expanded; write the full path")
        elif not os.path.isabs(value) and not relative_allowed:
            self.report(path, f"{value!r} must be an absolute path ({why})")

    def paths_are_usable(self) -> None:
        local_cluster = all_nodes_local(self.data)
        for path, value in self._cluster_paths():
            self._check_path(path, value, local_cluster, "relative paths are only allowed when every node is local")
        for index, node in _nodes(self.data):
            host = _str(node, "host")
            local = host is not None and is_loopback(host)
            for key in ("db", "seq_map_path"):
                node_path = _str(node, key)
                if node_path is not None:
                    self._check_path(
                        ("nodes", index, key), node_path, local, "relative paths are only allowed for local nodes"
                    )
        deploy = _section(self.data, "deploy")
        install_dir = _str(deploy, "install_dir")
        if install_dir is not None:
            self._check_path(("deploy", "install_dir"), install_dir, False, "a directory on the remote hosts")

    def databases_are_distinct(self) -> None:
        seen: dict[tuple[str, str], str] = {}
        for index, node in _nodes(self.data):
            host, db = _str(node, "host"), _str(node, "db")
            if host is None or db is None:
                continue
            key = (_address_key(host), os.path.normpath(db))
            name = _str(node, "name") or f"nodes[{index}]"
            if key in seen:
                self.report(("nodes", index, "db"), f"database {db!r} on {host} is also used by node {seen[key]}")
            else:
                seen[key] = name

    def tables_not_both_included_and_excluded(self) -> None:
        for index, node in _nodes(self.data):
            tables = _section(node, "tables")
            include, exclude = tables.get("include"), tables.get("exclude")
            if not isinstance(include, list) or not isinstance(exclude, list):
                continue
            for position, table in enumerate(exclude):
                if isinstance(table, str) and table in include:
                    self.report(
                        ("nodes", index, "tables", "exclude", position),
                        f"table {table!r} is both included and excluded",
                    )


def semantic_problems(document: SourceDocument) -> list[Problem]:
    return _Checker(document).run()
