"""The one explicit step that turns a valid spec document into the typed, fully defaulted model.

Runs only after schema and semantic checks passed, so it may trust types. Every default comes
from the model's dataclass defaults (a key not written is simply not passed), except the
defaults that depend on other settings: a node's `advertise` is its host, and its ports come from
the cluster-wide nats/observability ports. Relative paths allowed by the semantic checks are
resolved against the spec file's directory here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, overload

from .model import (
    API_VERSION,
    BatchLimits,
    Cluster,
    CompressionSettings,
    DeploySettings,
    JetStreamSettings,
    NatsAuth,
    NatsSettings,
    NatsTLS,
    Node,
    NodePorts,
    ObservabilitySettings,
    ReplicationSettings,
    SnapshotSettings,
    TableSelection,
    VerifySettings,
)
from .semantic import all_nodes_local, effective_node_ports, is_loopback


# A path given stays a str, an absent one stays None: the overloads tell the type checker so.
@overload
def _resolve(path: str, base_dir: Path, relative_allowed: bool) -> str: ...
@overload
def _resolve(path: None, base_dir: Path, relative_allowed: bool) -> None: ...
def _resolve(path: str | None, base_dir: Path, relative_allowed: bool) -> str | None:
    if path is None or os.path.isabs(path) or not relative_allowed:
        return path
    return os.path.normpath(base_dir / path)


def _floats(section: dict[str, Any], *keys: str) -> dict[str, Any]:
    """YAML `5` is an int; the model's seconds are floats."""
    return {key: float(value) if key in keys and value is not None else value for key, value in section.items()}


def _nats(section: dict[str, Any], base_dir: Path, local: bool) -> NatsSettings:
    values = _floats(dict(section), "connect_timeout_s")
    jetstream = dict(values.pop("jetstream", {}))
    for limit in ("max_memory", "max_file"):
        if limit in jetstream:
            jetstream[limit] = str(jetstream[limit])  # a byte count is as good as "10GB" to nats-server
    jetstream["store_dir"] = _resolve(jetstream.get("store_dir"), base_dir, local)
    auth = values.pop("auth", NatsAuth.mode)
    auth = dict(mode=auth) if isinstance(auth, str) else dict(auth)
    for key in ("password_file", "nkey_seed_file"):
        auth[key] = _resolve(auth.get(key), base_dir, local)
    tls = values.pop("tls", None)
    if tls is not None:
        paths = {key: _resolve(tls.get(key), base_dir, local) for key in ("cert", "key", "ca")}
        tls = NatsTLS(**paths, verify_clients=bool(tls.get("verify_clients", False)))
    if "urls" in values:
        values["urls"] = tuple(values["urls"])
    return NatsSettings(**values, jetstream=JetStreamSettings(**jetstream), auth=NatsAuth(**auth), tls=tls)


def _replication(section: dict[str, Any]) -> ReplicationSettings:
    values = _floats(
        dict(section), "cleanup_interval_s", "max_clock_skew_s", "tombstone_interval_s", "tombstone_node_timeout_s",
        "change_log_alarm_age_s",
    )
    batch = BatchLimits(**values.pop("batch", {}))
    compression = CompressionSettings(**values.pop("compression", {}))
    return ReplicationSettings(**values, batch=batch, compression=compression)


def _node(data: dict[str, Any], node: dict[str, Any], base_dir: Path) -> Node:
    values = dict(node)
    local = is_loopback(values["host"])
    values.setdefault("advertise", values["host"])
    values["ports"] = NodePorts(**effective_node_ports(data, node))
    tables = values.pop("tables", {})
    values["tables"] = TableSelection(
        include=tuple(tables.get("include", ())), exclude=tuple(tables.get("exclude", ()))
    )
    values["db"] = _resolve(values["db"], base_dir, local)
    values["seq_map_path"] = _resolve(values.get("seq_map_path"), base_dir, local)
    return Node(**values)


def build_cluster(data: dict[str, Any], base_dir: Path, source: Path | None = None) -> Cluster:
    """The model for a document that passed schema and semantic checks."""
    local = all_nodes_local(data)
    deploy = dict(data.get("deploy", {}))
    if deploy.get("state_dir") is not None:
        deploy["state_dir"] = _resolve(deploy["state_dir"], base_dir, True)
    if deploy.get("package_source", "build") != "build":
        deploy["package_source"] = _resolve(deploy["package_source"], base_dir, True)
    return Cluster(
        name=data["name"],
        api_version=data.get("apiVersion", API_VERSION),
        nodes=tuple(_node(data, node, base_dir) for node in data["nodes"]),
        # The schema files are read where the spec is (plan/apply), so relative is always allowed.
        schema=tuple(_resolve(path, base_dir, True) for path in data.get("schema", ())),
        nats=_nats(data.get("nats", {}), base_dir, local),
        replication=_replication(data.get("replication", {})),
        snapshots=SnapshotSettings(**_floats(dict(data.get("snapshots", {})), "interval_s")),
        verify=VerifySettings(**_floats(dict(data.get("verify", {})), "interval_s")),
        observability=ObservabilitySettings(**data.get("observability", {})),
        deploy=DeploySettings(**deploy),
        source=source,
    )
