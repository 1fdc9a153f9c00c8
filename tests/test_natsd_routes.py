"""Routes between the embedded servers: their own secret in every auth mode, mutual TLS with
`nats.tls`, and an unknown server pointed at a node's cluster port never joins.

Each attack runs a real stray nats-server that routes to the first node's cluster port, then
watches both sides: the stray must never appear among the node's routes and a message published
in the cluster must never reach a subscriber on the stray (nor the other way round).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from marmot_appliance.errors import MarmotError
from marmot_appliance.nats_client import connect_kwargs
from marmot_appliance.natsd.config import ServerConfig, check_config_file, render_server_config
from marmot_appliance.natsd.from_spec import ServerCredentials, monitor_endpoints, server_config_for
from marmot_appliance.natsd.process import NatsServerProcess, fetch_monitor_json, wait_for_meta_leader
from marmot_appliance.spec.model import Cluster, NatsAuth, NatsTLS
from tests.harness import free_ports
from tests.test_natsd_config import generated, local_cluster
from tests.tls_support import issue, make_ca

GENERATED = generated(password="client-Pass_word")
NODE = GENERATED.identities[0]  # n1's own identity: what a node host holds
ROUTE = {"route_user": "marmot-route", "route_password": "route-Secret_value"}
REFUSAL_ATTEMPTS = 3  # route connect attempts the stray must have made (and lost) before we judge


def with_auth(cluster: Cluster, auth: NatsAuth, tls: NatsTLS | None = None) -> Cluster:
    return dataclasses.replace(cluster, nats=dataclasses.replace(cluster.nats, auth=auth, tls=tls))


def start_servers(tmp_path: Path, cluster: Cluster, credentials: ServerCredentials) -> list[NatsServerProcess]:
    processes = []
    for node in cluster.nodes:
        cfg = server_config_for(cluster, node, str(tmp_path / node.name / "js"), credentials)
        path = tmp_path / f"{node.name}.conf"
        path.write_text(render_server_config(cfg))
        check_config_file(path)
        proc = NatsServerProcess(config_path=path, log_path=tmp_path / f"{node.name}.log")
        processes.append(proc)
        proc.start()
    for node, proc in zip(cluster.nodes, processes):
        proc.wait_listening("127.0.0.1", node.ports.client, timeout_s=30)
    wait_for_meta_leader(monitor_endpoints(cluster), timeout_s=60)
    return processes


def start_stray(tmp_path: Path, cluster: Cluster, route_auth: str = "", tls: NatsTLS | None = None, name: str = "stray",
                target_address: str = "127.0.0.1"):
    """A server nobody invited, routing to n1's cluster port (at `target_address`) with whatever
    it was given. It listens on 127.0.0.1 of the network namespace it runs in."""
    client, cluster_port, monitor = free_ports(3)
    target = cluster.nodes[0]
    cfg = ServerConfig(
        server_name=name,
        host="127.0.0.1",
        client_port=client,
        monitor_port=monitor,
        store_dir=str(tmp_path / "stray-js"),
        cluster_name=cluster.name,
        cluster_port=cluster_port,
        routes=(),
        tls_cert=tls.cert if tls else None,
        tls_key=tls.key if tls else None,
        tls_ca=tls.ca if tls else None,
    )
    route = f"nats-route://{route_auth}{target_address}:{target.ports.cluster}"
    text = render_server_config(cfg).replace("routes: []", f'routes: ["{route}"]')
    text = "\n".join(line for line in text.splitlines() if "store_dir" not in line) + "\n"
    text = text.replace("jetstream {\n", "jetstream {\n  enabled: false\n", 1)
    path = tmp_path / f"{name}.conf"
    path.write_text(text)
    proc = NatsServerProcess(config_path=path, log_path=tmp_path / f"{name}.log")
    proc.start()
    proc.wait_listening("127.0.0.1", client, timeout_s=30)
    return proc, cfg


def route_names(monitor_port: int) -> set[str]:
    routes = fetch_monitor_json("127.0.0.1", monitor_port, "routez").get("routes") or []
    return {route.get("remote_name") or route.get("remote_id") or "?" for route in routes}


def assert_stray_kept_out(tmp_path: Path, cluster: Cluster, stray_cfg: ServerConfig,
                          n1_routes: Callable[[], set[str]] | None = None) -> None:
    """Poll until the stray has tried (and failed) to route in REFUSAL_ATTEMPTS times; it must
    never show up as a route, on either side. `n1_routes` reads n1's route names (default: its
    monitor on 127.0.0.1; a remote host's monitor listens on that host's loopback only)."""
    n1_routes = n1_routes or (lambda: route_names(cluster.nodes[0].ports.monitor))
    log = tmp_path / f"{stray_cfg.server_name}.log"
    deadline = time.monotonic() + 120
    while True:
        assert stray_cfg.server_name not in n1_routes(), "the stray server joined the cluster"
        assert not route_names(stray_cfg.monitor_port), "the stray server has a route into the cluster"
        text = log.read_text(errors="replace")
        attempts = sum(text.count(sign) for sign in ("Error trying to connect to route", "Router connection closed", "TLS handshake error"))
        if attempts >= REFUSAL_ATTEMPTS:
            return
        assert time.monotonic() < deadline, f"stray made only {attempts} route attempts:\n{text[-3000:]}"
        time.sleep(0.2)


async def no_traffic_crosses(cluster_url: str, cluster_kwargs: dict, stray_url: str) -> None:
    """Publish on each side; neither side's subscriber may receive the other's message."""
    inside = await nats.connect(cluster_url, connect_timeout=5, allow_reconnect=False, **cluster_kwargs)
    outside = await nats.connect(stray_url, connect_timeout=5, allow_reconnect=False)
    try:
        seen_inside: list[bytes] = []
        seen_outside: list[bytes] = []

        async def record_inside(msg):
            seen_inside.append(msg.data)

        async def record_outside(msg):
            seen_outside.append(msg.data)

        await inside.subscribe(">", cb=record_inside)
        await outside.subscribe(">", cb=record_outside)
        await inside.flush()
        await outside.flush()
        for _ in range(5):
            await inside.publish("marmot-change-log-1.1", b"inside")
            await outside.publish("marmot-change-log-1.2", b"forged")
        await inside.flush()
        await outside.flush()
        # A round trip through each server (flush) has completed; give routed traffic one more.
        await asyncio.sleep(0.5)
        assert b"inside" not in seen_outside
        assert b"forged" not in seen_inside
    finally:
        await inside.close()
        await outside.close()


def _stop(processes) -> None:
    for proc in processes:
        proc.stop()


# -- rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["generated", "none", "nkey"])
def test_routes_use_their_own_secret_in_every_mode(tmp_path: Path, mode: str):
    cluster = local_cluster(3, auth=mode)
    creds = {"nkey": ServerCredentials(nkey="UABC"), "none": ServerCredentials()}.get(mode, GENERATED)
    text = render_server_config(
        server_config_for(cluster, cluster.nodes[0], str(tmp_path), dataclasses.replace(creds, **ROUTE))
    )
    cluster_block = text[text.index("cluster {") :]
    assert ROUTE["route_password"] in cluster_block and "authorization" in cluster_block
    assert all(i.password not in cluster_block for i in GENERATED.identities)  # never a client's password
    assert cluster_block.count(f"marmot-route:{ROUTE['route_password']}@") == 2


def test_clustered_server_without_route_secret_is_refused(tmp_path: Path):
    cluster = local_cluster(3, auth="none")
    with pytest.raises(MarmotError, match="route credentials"):
        server_config_for(cluster, cluster.nodes[0], str(tmp_path), ServerCredentials())


def test_monitor_listens_on_loopback_by_default(tmp_path: Path):
    cluster = local_cluster(3, host="10.77.0.11")
    creds = dataclasses.replace(GENERATED, **ROUTE)
    text = render_server_config(server_config_for(cluster, cluster.nodes[0], str(tmp_path), creds))
    assert f'http: "127.0.0.1:{cluster.nodes[0].ports.monitor}"' in text
    assert f'listen: "10.77.0.11:{cluster.nodes[0].ports.client}"' in text
    wide = dataclasses.replace(cluster, nats=dataclasses.replace(cluster.nats, monitor_address="0.0.0.0"))
    text = render_server_config(server_config_for(wide, wide.nodes[0], str(tmp_path), creds))
    assert f'http: "0.0.0.0:{cluster.nodes[0].ports.monitor}"' in text


# -- a stray server on real clusters -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["generated", "nkey", "none"])
def test_stray_server_cannot_route_in(tmp_path: Path, mode: str):
    """In nkey mode the cluster block used to have no authorization (a stray joined with no
    credentials); in generated mode the route password was the client password (a stray holding
    a client credential joined). Neither may join now."""
    cluster = local_cluster(3, auth=mode)
    kwargs: dict = {}
    if mode == "nkey":
        import nkeys

        seed_file = tmp_path / "user.nk"
        seed_file.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
        cluster = with_auth(cluster, NatsAuth(mode="nkey", nkey_seed_file=str(seed_file)))
        creds = ServerCredentials(nkey=nkeys.from_seed(seed_file.read_bytes()).public_key.decode())
        kwargs = {"nkeys_seed": str(seed_file)}
        stray_auth = ""
    elif mode == "generated":
        creds = GENERATED
        kwargs = {"user": NODE.user, "password": NODE.password}
        stray_auth = f"{NODE.user}:{NODE.password}@"  # what a node host holds
    else:
        creds = ServerCredentials()
        stray_auth = ""
    processes = start_servers(tmp_path, cluster, dataclasses.replace(creds, **ROUTE))
    try:
        stray, stray_cfg = start_stray(tmp_path, cluster, stray_auth)
        processes.append(stray)
        assert_stray_kept_out(tmp_path, cluster, stray_cfg)
        url = f"nats://127.0.0.1:{cluster.nodes[0].ports.client}"
        asyncio.run(asyncio.wait_for(no_traffic_crosses(url, kwargs, f"nats://127.0.0.1:{stray_cfg.client_port}"), 60))
        assert_stray_kept_out(tmp_path, cluster, stray_cfg)
    finally:
        _stop(processes)


def test_tls_routes_are_mutual_and_clients_can_be_verified(tmp_path: Path):
    """With nats.tls the routes use mutual TLS: the three servers (certificates from the cluster's
    CA) form a cluster; a stray holding the route secret but no TLS (routes used to be
    plaintext, so it joined) or a certificate from another CA is refused. With verify_clients a client without a certificate is refused and a node connects
    with the connect arguments the runtime uses."""
    ca = make_ca(tmp_path / "pki", "cluster")
    node_cert = issue(ca, tmp_path / "pki", "node")
    tls = NatsTLS(cert=str(node_cert.cert_path), key=str(node_cert.key_path), ca=str(ca.cert_path), verify_clients=True)
    cluster = with_auth(local_cluster(3, auth="none"), NatsAuth(mode="none"), tls=tls)
    processes = start_servers(tmp_path, cluster, ServerCredentials(**ROUTE))
    try:
        for node in cluster.nodes:
            assert len(route_names(node.ports.monitor)) >= 2, f"{node.name} has no TLS routes"
        route_secret = f"{ROUTE['route_user']}:{ROUTE['route_password']}@"
        plain, plain_cfg = start_stray(tmp_path, cluster, route_secret, name="plain")
        processes.append(plain)
        assert_stray_kept_out(tmp_path, cluster, plain_cfg)
        rogue_ca = make_ca(tmp_path / "rogue", "rogue")
        rogue = issue(rogue_ca, tmp_path / "rogue", "stray")
        rogue_tls = NatsTLS(cert=str(rogue.cert_path), key=str(rogue.key_path), ca=str(ca.cert_path))
        stray, stray_cfg = start_stray(tmp_path, cluster, route_secret, tls=rogue_tls)
        processes.append(stray)
        assert_stray_kept_out(tmp_path, cluster, stray_cfg)

        node = cluster.nodes[0]

        async def probe():
            with pytest.raises(Exception):  # no client certificate: the handshake fails
                await nats.connect(
                    f"tls://127.0.0.1:{node.ports.client}",
                    tls=__import__("ssl").create_default_context(cafile=str(ca.cert_path)),
                    connect_timeout=5,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                )
            kwargs = connect_kwargs(cluster, node)
            kwargs.update(allow_reconnect=False, max_reconnect_attempts=0)
            nc = await nats.connect(**kwargs)
            try:
                assert (await nc.jetstream().account_info()) is not None
            finally:
                await nc.close()

        asyncio.run(asyncio.wait_for(probe(), timeout=60))
    finally:
        _stop(processes)
