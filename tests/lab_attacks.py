"""Attacks on a cluster deployed by ansible/site.yml, from the lab's controller namespace.

tests/test_lab_deploy.py runs this module there (`ip netns exec <controller> python -m
tests.lab_attacks ...`): lab traffic leaves only from inside a lab namespace (docs/deploy.md, "The lab"), and a
stray nats-server started here sits on the lab network like any other machine would. The
checks are the ones the quick-start cluster passes on 127.0.0.1 (tests/test_natsd_routes.py,
tests/test_security_cluster.py), pointed at node1's address:

- a stray server routing to node1's cluster port, with no credentials and with node1's own
  client credential, never joins and no message crosses;
- a client without credentials is refused;
- node1's identity publishing on node2's subject token, and the reader's identity publishing at
  all, are refused (the message with another origin in its body on node1's own token is stored
  by the servers; the test then checks on the hosts that no database applied it).

Prints one JSON line: {"refusals": {attempt: reason}}. Any failed check raises (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import subprocess
import sys
from pathlib import Path

from marmot_appliance.appliance.credentials import credentials_path
from marmot_appliance.appliance.state import StateDir
from marmot_appliance.lab.ssh import ssh_command
from marmot_appliance.lab.topology import topology_for
from marmot_appliance.spec.loader import load_cluster
from tests.test_natsd_routes import assert_stray_kept_out, no_traffic_crosses, start_stray
from tests.test_security_cluster import assert_unauthenticated_refused, change_payload, forge_origins

LAB_ITEMS_COLUMNS = ("id", "origin", "n")  # the `items` table tests/test_lab_deploy.py creates
ROUTEZ = (
    "import json, urllib.request\n"
    "routes = json.load(urllib.request.urlopen('http://127.0.0.1:8222/routez', timeout=5)).get('routes') or []\n"
    "print(json.dumps([r.get('remote_name') or r.get('remote_id') or '?' for r in routes]))\n"
)


def node_routes(topology, host: str, python: str) -> set[str]:
    """Route names as `host`'s server sees them (its monitor listens on its loopback only)."""
    result = subprocess.run(ssh_command(topology, host, f"{python} -"), input=ROUTEZ, capture_output=True,
                            text=True, timeout=60, check=True)
    return set(json.loads(result.stdout))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("controller_state")
    parser.add_argument("workdir")
    parser.add_argument("--host-python", required=True)
    args = parser.parse_args(argv)
    cluster = load_cluster(args.spec)
    topology = topology_for(cluster)
    node1 = cluster.nodes[0]
    workdir = Path(args.workdir)
    secrets = json.loads(credentials_path(StateDir(Path(args.controller_state))).read_text())
    n1 = (secrets["nodes"][node1.name]["user"], secrets["nodes"][node1.name]["password"])
    reader = (secrets["reader"]["user"], secrets["reader"]["password"])
    url = f"nats://{node1.advertise}:{node1.ports.client}"
    n1_routes = functools.partial(node_routes, topology, node1.name, args.host_python)

    inside = n1_routes()
    assert len(inside) == len(cluster.nodes) - 1, f"{node1.name} does not route to its peers: {inside}"
    for name, route_auth in (("stray-anonymous", ""), ("stray-node1", f"{n1[0]}:{n1[1]}@")):
        stray, stray_cfg = start_stray(workdir, cluster, route_auth, name=name, target_address=node1.advertise)
        try:
            assert_stray_kept_out(workdir, cluster, stray_cfg, n1_routes)
            kwargs = {"user": n1[0], "password": n1[1]}
            stray_url = f"nats://127.0.0.1:{stray_cfg.client_port}"
            asyncio.run(asyncio.wait_for(no_traffic_crosses(url, kwargs, stray_url), 60))
            assert_stray_kept_out(workdir, cluster, stray_cfg, n1_routes)
        finally:
            stray.stop()
    assert n1_routes() == inside, "node1's routes changed during the stray attempts"

    asyncio.run(asyncio.wait_for(assert_unauthenticated_refused(url), 30))

    payload = functools.partial(change_payload, columns=LAB_ITEMS_COLUMNS)
    refusals = asyncio.run(asyncio.wait_for(forge_origins(url, n1, reader, payload), 60))
    print(json.dumps({"refusals": refusals}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
