"""The Ansible inventory a cluster spec describes (used by ansible/plugins/inventory/marmot_spec.py).

One source of truth: the spec is loaded by `spec.loader.load_cluster` (validated, defaulted) and
mapped here onto groups and host variables. Variables are named after the role that reads them
(`nats_server_*`, `marmot_node_*`, `marmot_packages_*`), so inventory values override the roles'
defaults in the normal Ansible precedence. No secrets appear here: passwords are rendered by the
filter plugins at task time and logged nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marmot_appliance.nats_client import default_state_dir
from marmot_appliance.natsd.from_spec import listen_host, monitor_probe_host
from marmot_appliance.spec.model import Cluster, Node
from marmot_appliance.spec.render import cluster_to_dict

NATS_GROUP = "nats_servers"
NODE_GROUP = "marmot_nodes"
REMOTE_STATE_DIR = "/var/lib/marmot-appliance/node"  # beside nats/ and data/, each owned by its user
REMOTE_NATS_STORE_DIR = "/var/lib/marmot-appliance/nats"
REMOTE_SPEC_PATH = "/etc/marmot-appliance/cluster.yaml"
REMOTE_SCHEMA_DIR = "/etc/marmot-appliance/schema"  # the spec's schema files, copied beside it


@dataclass
class Inventory:
    groups: dict[str, list[str]] = field(default_factory=dict)
    group_vars: dict[str, dict[str, Any]] = field(default_factory=dict)  # "all" holds cluster-wide vars
    host_vars: dict[str, dict[str, Any]] = field(default_factory=dict)


def health_url(cluster: Cluster, node: Node) -> str:
    """The node's /health as seen from its own host (the role checks it there)."""
    address = cluster.observability.listen_address
    if address in ("0.0.0.0", "::", ""):
        address = "127.0.0.1"
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{node.ports.metrics}/health"


def wheelhouse_dir(cluster: Cluster) -> tuple[Path, bool]:
    """(directory of wheels on the controller, whether the controller builds it)."""
    source = cluster.deploy.package_source
    if source == "build":
        return default_state_dir(cluster) / "wheelhouse", True
    path = Path(source)
    if not path.is_absolute() and cluster.source is not None:
        path = cluster.source.parent / path
    return path, False


def remote_schema_files(cluster: Cluster) -> list[dict[str, str]]:
    """Where each declared schema file goes on the hosts: numbered, so two files of one name
    in different directories stay apart and the order is visible."""
    return [
        {"src": path, "dest": f"{REMOTE_SCHEMA_DIR}/{index:02d}-{Path(path).name}"}
        for index, path in enumerate(cluster.schema, start=1)
    ]


def host_spec(cluster: Cluster) -> dict[str, Any]:
    """The fully defaulted spec as written on the hosts: schema files at their host paths."""
    document = cluster_to_dict(cluster)
    document["schema"] = [entry["dest"] for entry in remote_schema_files(cluster)]
    return document


def inventory_for(cluster: Cluster) -> Inventory:
    if cluster.source is None:
        raise ValueError("inventory_for needs a cluster loaded from a file (cluster.source)")
    wheels, build = wheelhouse_dir(cluster)
    manager = cluster.deploy.service_manager
    install_dir = cluster.deploy.install_dir
    inventory = Inventory()
    inventory.group_vars["all"] = {
        "marmot_cluster_name": cluster.name,
        "marmot_spec_path": str(cluster.source),
        "marmot_controller_state_dir": str(default_state_dir(cluster)),
        "marmot_packages_install_dir": install_dir,
        "marmot_packages_wheelhouse_dir": str(wheels),
        "marmot_packages_build_wheelhouse": build,
        "marmot_packages_extra_requirements": ["supervisor"] if manager == "supervisor" else [],
        "nats_server_install_dir": install_dir,
        "nats_server_service_manager": manager,
        "nats_server_auth_mode": cluster.nats.auth.mode,
        "marmot_node_install_dir": install_dir,
        "marmot_node_service_manager": manager,
        "marmot_node_state_dir": REMOTE_STATE_DIR,
        "marmot_node_spec_path": REMOTE_SPEC_PATH,
        "marmot_node_cluster_spec": host_spec(cluster),
        "marmot_node_schema_files": remote_schema_files(cluster),
        "marmot_node_auth_mode": cluster.nats.auth.mode,
    }
    inventory.groups[NODE_GROUP] = []
    if cluster.nats.embedded:
        inventory.groups[NATS_GROUP] = []
    for node in sorted(cluster.nodes, key=lambda n: n.id):
        inventory.groups[NODE_GROUP].append(node.name)
        host = {
            "ansible_host": node.host,
            "ansible_become": cluster.deploy.become,
            "marmot_node_name": node.name,
            "marmot_node_db": node.db,
            "marmot_node_health_url": health_url(cluster, node),
        }
        if cluster.deploy.ssh_user:  # else Ansible's own default (your user name, ssh config)
            host["ansible_user"] = cluster.deploy.ssh_user
        if cluster.nats.embedded:
            inventory.groups[NATS_GROUP].append(node.name)
            host.update(
                {
                    "nats_server_node_name": node.name,
                    "nats_server_listen_host": listen_host(node),
                    "nats_server_client_port": node.ports.client,
                    "nats_server_monitor_port": node.ports.monitor,
                    "nats_server_monitor_host": monitor_probe_host(cluster, node),
                    "nats_server_store_dir": cluster.nats.jetstream.store_dir or REMOTE_NATS_STORE_DIR,
                }
            )
        inventory.host_vars[node.name] = host
    return inventory
