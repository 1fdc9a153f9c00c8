#!/usr/bin/python
"""Ansible module: the spec's declared schema on this host's node database (docs/schema.md).

Runs `marmot-appliance schema plan|apply --db DB --schema FILE...` with the schema files as the
controller has them (written to a private temporary directory), so check mode shows what the
files about to be deployed would change. Reports each change as a diff header, which
`marmot-appliance plan` prints under the host.
"""

from __future__ import annotations

DOCUMENTATION = r"""
module: marmot_schema
short_description: Apply the declared schema (CREATE TABLE/INDEX/VIEW/TRIGGER files) additively
options:
  marmot:
    description: Path of the marmot-appliance executable on the host.
    type: path
    required: true
  db:
    description: The node's SQLite database.
    type: path
    required: true
  node:
    description: Node name, for messages.
    type: str
    required: true
  files:
    description: The schema files in order, each {name, content}.
    type: list
    elements: dict
    required: true
  skip_incompatible:
    description: Apply the additive changes and leave incompatible ones as they are.
    type: bool
    default: false
"""

import json
import os
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(
        argument_spec=dict(
            marmot=dict(type="path", required=True),
            db=dict(type="path", required=True),
            node=dict(type="str", required=True),
            files=dict(type="list", elements="dict", required=True),
            skip_incompatible=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    params = module.params
    if not os.path.isfile(params["marmot"]) or not os.path.isfile(params["db"]):
        # A fresh host in check mode: nothing installed yet, every declared object will be created.
        if module.check_mode:
            module.exit_json(changed=True, diff=[{"before": "", "after": "", "after_header": "schema: every declared object (new database)"}])
        module.fail_json(msg=f"{params['marmot']} or {params['db']} is missing; the node must be installed first")
    scratch = tempfile.mkdtemp(prefix="marmot-schema-")
    try:
        arguments = ["--db", params["db"], "--node", params["node"]]
        for index, entry in enumerate(params["files"]):
            path = os.path.join(scratch, f"{index:02d}-{os.path.basename(str(entry.get('name') or 'schema.sql'))}")
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(str(entry.get("content") or ""))
            arguments += ["--schema", path]
        rc, out, err = module.run_command([params["marmot"], "schema", "plan", "--output", "json", *arguments])
        if rc != 0:
            module.fail_json(msg=f"schema plan failed: {err.strip() or out.strip()}", rc=rc)
        changes = json.loads(out).get(params["node"], [])
        pending = [c for c in changes if c["symbol"] in ("+", "~", "!")]
        diff = [{"before": "", "after": "", "after_header": "schema: " + (
            f"{c['symbol']} {c['kind']} {c['name']}" + (f": {c['detail']}" if c["detail"] else ""))} for c in pending]
        if module.check_mode or not pending:
            module.exit_json(changed=bool(pending), diff=diff, changes=changes)
        command = [params["marmot"], "schema", "apply", *arguments]
        if params["skip_incompatible"]:
            command.append("--skip-incompatible-schema")
        rc, out, err = module.run_command(command)
        if rc != 0:
            module.fail_json(msg=err.strip() or out.strip(), rc=rc, changes=changes)
        applied = any(c["symbol"] in ("+", "~") for c in pending)
        module.exit_json(changed=applied, diff=diff, changes=changes, stdout=out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
