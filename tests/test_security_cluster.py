"""The quick-start cluster, as `apply` generates it with defaults, under attack on 127.0.0.1.

One module-scoped cluster (3 nats-servers + 3 node runtimes, real SQLite files): a stray
nats-server routing in with the client credential every node and reader holds, an
unauthenticated client, and the files apply creates (databases, state directory).
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import stat
from pathlib import Path

import nats
import pytest

from tests.test_appliance_local import (
    SCHEMA,
    Appliance,
    assert_ok,
    describe,
    emergency_stop,
    wait_converged,
    write_rows,
)
from tests.test_appliance_support import chown_tree, make_workdir, spec_data
from tests.test_natsd_routes import assert_stray_kept_out, no_traffic_crosses, start_stray

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def applied():
    workdir = make_workdir()
    app = Appliance(workdir, spec_data())
    try:
        result = app.cli("apply", str(app.spec))
        assert_ok(result, "Apply complete", "Created empty database")
        for node in app.node_names():
            conn = sqlite3.connect(app.db(node))
            conn.executescript(SCHEMA)
            conn.close()
        chown_tree(workdir / "data")
        yield app
    finally:
        result = app.cli("destroy", str(app.spec), "--purge")
        emergency_stop(app)
        shutil.rmtree(workdir, ignore_errors=True)
        assert result.returncode == 0, describe(result)


def _cluster_of(app: Appliance):
    from marmot_appliance.spec.loader import load_cluster

    return load_cluster(app.spec)


def test_created_databases_and_state_dir_are_private(applied: Appliance):
    """Databases apply creates used to be 0644 (umask); the state directory is owner-only."""
    for node in applied.node_names():
        mode = stat.S_IMODE(applied.db(node).stat().st_mode)
        assert mode == 0o600, f"{node}: database mode {oct(mode)}"
    assert stat.S_IMODE(applied.state_dir.stat().st_mode) == 0o700


def test_stray_server_with_the_client_credential_cannot_route_in(applied: Appliance, tmp_path: Path):
    """The route password used to be the client password: any node, reader or operator holding
    it could join a server to the cluster, read every change and inject forged ones."""
    cluster = _cluster_of(applied)
    user, password = applied.credentials()
    stray, stray_cfg = start_stray(tmp_path, cluster, f"{user}:{password}@")
    try:
        assert_stray_kept_out(tmp_path, cluster, stray_cfg)
        url = f"nats://127.0.0.1:{applied.ports('n1')['client']}"
        kwargs = {"user": user, "password": password}
        asyncio.run(asyncio.wait_for(no_traffic_crosses(url, kwargs, f"nats://127.0.0.1:{stray_cfg.client_port}"), 60))
        assert_stray_kept_out(tmp_path, cluster, stray_cfg)
    finally:
        stray.stop()
    # The cluster still replicates.
    write_rows(applied.db("n1"), "n1", 3)
    wait_converged(applied, 3)


def test_unauthenticated_client_is_refused(applied: Appliance):
    async def probe():
        with pytest.raises(Exception) as refused:
            await nats.connect(
                f"nats://127.0.0.1:{applied.ports('n2')['client']}",
                connect_timeout=5,
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )
        assert "authorization" in str(refused.value).lower()

    asyncio.run(asyncio.wait_for(probe(), 30))
