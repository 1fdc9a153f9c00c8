"""The model back to a plain, fully defaulted document of the same shape as a spec.

`config show` prints this as YAML; it validates again and loads to the same model (a test keeps
that round trip). `None` stays `null`: those settings are computed later from the deployment
(e.g. `log_replicas: null` means min(3, NATS servers)).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .model import Cluster


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def cluster_to_dict(cluster: Cluster) -> dict[str, Any]:
    return {
        "apiVersion": cluster.api_version,
        "kind": "Cluster",
        "name": cluster.name,
        "schema": list(cluster.schema),
        "nodes": [_plain(node) for node in cluster.nodes],
        "nats": _plain(cluster.nats),
        "replication": _plain(cluster.replication),
        "snapshots": _plain(cluster.snapshots),
        "verify": _plain(cluster.verify),
        "observability": _plain(cluster.observability),
        "deploy": _plain(cluster.deploy),
    }
