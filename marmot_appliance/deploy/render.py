"""Secret-bearing files for remote hosts, rendered on the controller at task time.

Called by the filter plugins in ansible/plugins/filter/marmot.py. The nats-server configuration
comes from the same `server_config_for` + `render_server_config` the local appliance uses.
"""

from __future__ import annotations

import json
from pathlib import Path

from marmot_appliance.appliance.credentials import credentials_for_apply, node_credentials_document
from marmot_appliance.appliance.state import StateDir
from marmot_appliance.natsd.config import render_server_config
from marmot_appliance.natsd.from_spec import server_config_for
from marmot_appliance.spec.loader import load_cluster


def nats_server_config_text(spec_path: str, node_name: str, store_dir: str, controller_state_dir: str) -> str:
    cluster = load_cluster(spec_path)
    credentials = credentials_for_apply(cluster, StateDir(Path(controller_state_dir)))
    config = server_config_for(cluster, cluster.node(node_name), store_dir, credentials)
    return render_server_config(config)


def client_credentials_json(spec_path: str, controller_state_dir: str, node_name: str) -> str:
    """The host's <state_dir>/secrets/nats-credentials.json — its own node's identity only — or
    "" when auth is not generated."""
    cluster = load_cluster(spec_path)
    if cluster.nats.auth.mode != "generated":
        return ""
    credentials = credentials_for_apply(cluster, StateDir(Path(controller_state_dir)))
    return json.dumps(node_credentials_document(credentials, cluster.node(node_name).name)) + "\n"


def schema_files_for_host(spec_path: str) -> list[dict[str, str]]:
    """The declared schema files, in order, as [{"name", "content"}] (checked by the loader)."""
    cluster = load_cluster(spec_path)
    return [{"name": Path(path).name, "content": Path(path).read_text(encoding="utf-8-sig")} for path in cluster.schema]
