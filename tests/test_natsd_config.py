"""The spec -> nats-server config mapping: accepted by `nats-server -t`, and it really runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from marmot_appliance.errors import MarmotError, NatsServerError
from marmot_appliance.natsd.config import check_config_file, render_server_config
from marmot_appliance.natsd.from_spec import Identity, ServerCredentials, monitor_endpoints, server_config_for
from marmot_appliance.natsd.process import NatsServerProcess, wait_for_meta_leader
from marmot_appliance.spec.model import Cluster, NatsAuth, NatsSettings, Node, NodePorts
from tests.harness import free_ports


def local_cluster(size: int = 3, auth: str = "generated", host: str = "127.0.0.1") -> Cluster:
    ports = free_ports(size * 4)
    nodes = tuple(
        Node(
            name=f"n{i + 1}",
            id=i + 1,
            host=host,
            advertise=host,
            db=f"/tmp/unused-{i}.db",
            ports=NodePorts(*ports[i * 4 : i * 4 + 4]),
        )
        for i in range(size)
    )
    return Cluster(name="shop", nodes=nodes, nats=NatsSettings(auth=NatsAuth(mode=auth)))


def generated(nodes=("n1", "n2", "n3"), password: str = "s3cret-Pass_word") -> ServerCredentials:
    """Generated-mode credentials: one identity per node plus the reader, and the route secret."""
    identities = tuple(Identity(f"marmot-{name}", f"{password}-{name}", name) for name in nodes)
    return ServerCredentials(
        identities=identities + (Identity("marmot-reader", f"{password}-reader"),),
        route_user="marmot-route",
        route_password="r0ute-Secret",
    )


CREDS = generated()
N1 = CREDS.identities[0]


def test_routes_point_at_every_other_node(tmp_path: Path):
    cluster = local_cluster(3)
    cfg = server_config_for(cluster, cluster.nodes[0], str(tmp_path / "js"), CREDS)
    others = cluster.nodes[1:]
    assert cfg.routes == tuple(f"127.0.0.1:{n.ports.cluster}" for n in others)
    assert cfg.server_name == "shop-n1"
    assert cfg.cluster_name == "shop"
    assert (cfg.client_port, cfg.cluster_port, cfg.monitor_port) == (
        cluster.nodes[0].ports.client,
        cluster.nodes[0].ports.cluster,
        cluster.nodes[0].ports.monitor,
    )
    assert [(u.user, u.password) for u in cfg.users] == [(i.user, i.password) for i in CREDS.identities]


def test_password_is_not_in_repr():
    assert all(identity.password not in repr(CREDS) for identity in CREDS.identities)
    assert CREDS.route_password not in repr(CREDS)


def test_single_node_is_standalone(tmp_path: Path):
    cluster = local_cluster(1)
    cfg = server_config_for(cluster, cluster.nodes[0], str(tmp_path / "js"), CREDS)
    assert cfg.cluster_name is None and cfg.routes == ()


def test_auth_none_ignores_credentials(tmp_path: Path):
    cluster = local_cluster(3, auth="none")
    cfg = server_config_for(cluster, cluster.nodes[0], str(tmp_path / "js"), CREDS)
    assert cfg.users == ()
    text = render_server_config(cfg)
    assert "authorization" not in text[: text.index("cluster {")]  # only the routes authenticate


def test_missing_credentials_is_a_clear_error(tmp_path: Path):
    cluster = local_cluster(3)
    with pytest.raises(MarmotError, match="no route credentials"):
        server_config_for(cluster, cluster.nodes[0], str(tmp_path / "js"), None)
    single = local_cluster(1)
    with pytest.raises(MarmotError, match="no credentials"):
        server_config_for(single, single.nodes[0], str(tmp_path / "js"), None)


def test_remote_nodes_listen_on_their_advertised_address(tmp_path: Path):
    cluster = local_cluster(3, host="10.77.0.11")
    cfg = server_config_for(cluster, cluster.nodes[1], "/var/lib/marmot-appliance/nats", CREDS)
    assert cfg.host == "10.77.0.11"
    assert cfg.advertise == "10.77.0.11"


@pytest.mark.parametrize("auth", ["generated", "none"])
def test_rendered_config_passes_nats_server_check(tmp_path: Path, auth: str):
    cluster = local_cluster(3, auth=auth)
    for node in cluster.nodes:
        path = tmp_path / f"{node.name}.conf"
        path.write_text(render_server_config(server_config_for(cluster, node, str(tmp_path / node.name), CREDS)))
        check_config_file(path)


def test_nats_server_check_rejects_garbage(tmp_path: Path):
    path = tmp_path / "bad.conf"
    path.write_text("listen: {{{ nonsense\n")
    with pytest.raises(NatsServerError, match="rejected"):
        check_config_file(path)


def test_rendered_cluster_runs_and_enforces_auth(tmp_path: Path):
    """Three servers from the rendered configs form a JetStream cluster that demands the password."""
    cluster = local_cluster(3)
    processes = []
    try:
        for node in cluster.nodes:
            cfg = server_config_for(cluster, node, str(tmp_path / node.name / "js"), CREDS)
            path = tmp_path / f"{node.name}.conf"
            path.write_text(render_server_config(cfg))
            proc = NatsServerProcess(config_path=path, log_path=tmp_path / f"{node.name}.log")
            proc.start()
            processes.append(proc)
        for node, proc in zip(cluster.nodes, processes):
            proc.wait_listening("127.0.0.1", node.ports.client, timeout_s=30)
        wait_for_meta_leader(monitor_endpoints(cluster), timeout_s=60)
        url = f"nats://127.0.0.1:{cluster.nodes[0].ports.client}"

        async def probe():
            with pytest.raises(Exception) as refused:
                await nats.connect(url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0)
            assert "authorization" in str(refused.value).lower()
            nc = await nats.connect(url, user=N1.user, password=N1.password, connect_timeout=5)
            try:
                info = await nc.jetstream().account_info()
                assert info is not None
            finally:
                await nc.close()

        asyncio.run(asyncio.wait_for(probe(), timeout=60))
    finally:
        for proc in processes:
            proc.stop()


def test_nkey_auth_runs_end_to_end(tmp_path: Path):
    """auth: nkey — the server is configured with the public key derived from the seed file, a
    node connects with the connect arguments the runtime uses, and a client without it is refused."""
    import dataclasses
    import os

    import nkeys

    from marmot_appliance.appliance.credentials import credentials_from_spec
    from marmot_appliance.nats_client import connect_kwargs

    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    seed_file.chmod(0o600)
    base = local_cluster(1, auth="nkey")
    cluster = dataclasses.replace(
        base, nats=dataclasses.replace(base.nats, auth=NatsAuth(mode="nkey", nkey_seed_file=str(seed_file)))
    )
    node = cluster.nodes[0]
    credentials = credentials_from_spec(cluster)
    assert credentials.nkey.startswith("U") and credentials.password is None
    config_path = tmp_path / "n1.conf"
    config_path.write_text(render_server_config(server_config_for(cluster, node, str(tmp_path / "js"), credentials)))
    assert seed_file.read_text().strip() not in config_path.read_text()  # only the public key
    proc = NatsServerProcess(config_path=config_path, log_path=tmp_path / "n1.log")
    proc.start()
    try:
        proc.wait_listening("127.0.0.1", node.ports.client, timeout_s=30)
        url = f"nats://127.0.0.1:{node.ports.client}"

        async def probe():
            with pytest.raises(Exception) as refused:
                await nats.connect(url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0)
            assert "authorization" in str(refused.value).lower()
            kwargs = connect_kwargs(cluster, node)
            kwargs.update(allow_reconnect=False, max_reconnect_attempts=0)
            nc = await nats.connect(**kwargs)
            try:
                assert (await nc.jetstream().account_info()) is not None
            finally:
                await nc.close()

        asyncio.run(asyncio.wait_for(probe(), timeout=60))
    finally:
        proc.stop()
