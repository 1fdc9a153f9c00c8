"""Filters that render secret-bearing files from the cluster spec, on the controller."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError


def _render(function_name, *args):
    try:
        from marmot_appliance.deploy import render
        from marmot_appliance.errors import MarmotError
    except ImportError as exc:
        raise AnsibleFilterError(f"marmot-appliance is not importable by this Ansible: {exc}") from exc
    try:
        return getattr(render, function_name)(*args)
    except MarmotError as exc:
        raise AnsibleFilterError(str(exc)) from exc


def marmot_nats_server_config(spec_path, node_name, store_dir, controller_state_dir):
    """nats-server.conf of one node (same renderer as the local appliance)."""
    return _render("nats_server_config_text", str(spec_path), str(node_name), str(store_dir), str(controller_state_dir))


def marmot_nats_client_credentials(spec_path, controller_state_dir, node_name):
    """secrets/nats-credentials.json for one node runtime: its own identity ("" unless auth is generated)."""
    return _render("client_credentials_json", str(spec_path), str(controller_state_dir), str(node_name))


def marmot_schema_files(spec_path):
    """The spec's declared schema files as the controller has them: [{name, content}] (unsafe:
    SQL text is never templated)."""
    from ansible.utils.unsafe_proxy import wrap_var

    return wrap_var(_render("schema_files_for_host", str(spec_path)))


class FilterModule:
    def filters(self):
        return {
            "marmot_nats_server_config": marmot_nats_server_config,
            "marmot_nats_client_credentials": marmot_nats_client_credentials,
            "marmot_schema_files": marmot_schema_files,
        }
