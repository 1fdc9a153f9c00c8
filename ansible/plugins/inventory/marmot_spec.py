"""Ansible inventory plugin: a marmot-appliance cluster spec is the inventory."""

from __future__ import annotations

DOCUMENTATION = r"""
    name: marmot_spec
    short_description: Inventory from a marmot-appliance cluster spec
    description:
        - "Reads a cluster spec (C(apiVersion=marmot-appliance/v1), C(kind=Cluster)) with the
          package's own loader (validated and defaulted, no second parser) and turns it into the
          groups C(nats_servers) and C(marmot_nodes) plus the variables the roles read."
        - Needs the marmot-appliance package importable by the Python that runs Ansible.
    options: {}
"""

EXAMPLES = r"""
# ANSIBLE_CONFIG=ansible/ansible.cfg ansible-inventory -i vagrant/cluster.yaml --graph
"""

import re

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin

SPEC_MARKERS = (re.compile(r"^apiVersion:\s*['\"]?marmot-appliance/", re.M), re.compile(r"^kind:\s*['\"]?Cluster", re.M))


class InventoryModule(BaseInventoryPlugin):
    NAME = "marmot_spec"

    def verify_file(self, path):
        if not super().verify_file(path) or not path.endswith((".yaml", ".yml")):
            return False
        try:
            with open(path, encoding="utf-8") as handle:
                head = handle.read(65536)
        except OSError:
            return False
        return all(marker.search(head) for marker in SPEC_MARKERS)

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        try:
            from marmot_appliance.deploy.inventory import inventory_for
            from marmot_appliance.errors import MarmotError, SpecError
            from marmot_appliance.spec.loader import load_cluster
        except ImportError as exc:
            raise AnsibleParserError(
                f"marmot_spec: the marmot-appliance package is not importable by this Ansible ({exc}); "
                "run ansible-playbook from the environment where marmot-appliance is installed"
            ) from exc
        try:
            cluster = load_cluster(path)
            data = inventory_for(cluster)
        except SpecError as exc:
            raise AnsibleParserError("invalid cluster spec:\n" + "\n".join(exc.problems)) from exc
        except MarmotError as exc:
            raise AnsibleParserError(f"marmot_spec: {exc}") from exc
        for group, hosts in data.groups.items():
            self.inventory.add_group(group)
            for host in hosts:
                self.inventory.add_host(host, group=group)
        for group, variables in data.group_vars.items():
            for key, value in variables.items():
                self.inventory.set_variable(group, key, value)
        for host, variables in data.host_vars.items():
            for key, value in variables.items():
                self.inventory.set_variable(host, key, value)
