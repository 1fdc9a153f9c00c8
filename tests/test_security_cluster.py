"""The quick-start cluster, as `apply` generates it with defaults, under attack on 127.0.0.1.

One module-scoped cluster (3 nats-servers + 3 node runtimes, real SQLite files): a stray
nats-server routing in with the client credential every node and reader holds, an
unauthenticated client, and the files apply creates (databases, state directory).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import stat
import time
from pathlib import Path

import nats
import pytest

from tests.harness import settled
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
    data = spec_data()
    data["verify"] = {"interval_s": 3}  # the continuous convergence check runs as each node
    app = Appliance(workdir, data)
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


def client_url(app: Appliance, node: str = "n1") -> str:
    return f"nats://127.0.0.1:{app.ports(node)['client']}"


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
    user, password = applied.credentials("n1")  # what a node (or, before, every reader) holds
    stray, stray_cfg = start_stray(tmp_path, cluster, f"{user}:{password}@")
    try:
        assert_stray_kept_out(tmp_path, cluster, stray_cfg)
        url = client_url(applied)
        kwargs = {"user": user, "password": password}
        asyncio.run(asyncio.wait_for(no_traffic_crosses(url, kwargs, f"nats://127.0.0.1:{stray_cfg.client_port}"), 60))
        assert_stray_kept_out(tmp_path, cluster, stray_cfg)
    finally:
        stray.stop()
    # The cluster still replicates.
    write_rows(applied.db("n1"), "n1", 3)
    wait_converged(applied, 3)


async def assert_unauthenticated_refused(url: str) -> None:
    """A client without credentials is refused with an authorization error."""
    with pytest.raises(Exception) as refusal:
        await nats.connect(url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0)
    assert "authorization" in str(refusal.value).lower(), refusal.value


def test_unauthenticated_client_is_refused(applied: Appliance):
    asyncio.run(asyncio.wait_for(assert_unauthenticated_refused(client_url(applied, 'n2')), 30))


# -- identities: a node publishes only its own changes, readers only read ------------------------

SUBJECT = "marmot-change-log-1"  # the quick start's one shard
STREAM = "marmot-changes-1"


ITEMS_COLUMNS = ("id", "origin", "qty", "payload")  # the quick start's `items` (SCHEMA)


def change_payload(origin: int, row_id: str, columns: tuple[str, ...] = ITEMS_COLUMNS) -> bytes:
    """A well-formed change message for `items` (id, origin, then integer and blob columns),
    exactly what a node with id `origin` sends."""
    from marmot_appliance.replication.codec import encode_batch
    from marmot_appliance.replication.types import ChangeBatch, RowChange

    version = (int(time.time() * 1000) << 16) + 1
    filler = {"qty": 7, "n": 7, "payload": b"x"}
    row = RowChange("items", "upsert", (row_id,), columns,
                    (row_id, "forged?", *(filler[column] for column in columns[2:])), version, origin)
    return encode_batch(ChangeBatch(origin=origin, rows=(row,), primary_keys={"items": ("id",)}))


async def connect_as(url: str, user: str, password: str, errors: list[str]):
    async def record(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(url, user=user, password=password, connect_timeout=5, allow_reconnect=False,
                              error_cb=record)


async def refused(request, errors: list[str]) -> str:
    """Run a publish / JetStream request that the servers must refuse; returns why."""
    try:
        await request()
    except Exception as exc:  # noqa: BLE001 - a timeout (no ack) or an API error: both are refusals
        await asyncio.sleep(0.2)  # the server's -ERR arrives asynchronously
        return " ".join(errors) or repr(exc)
    raise AssertionError("the servers accepted a request this identity must not make")


def rows_with_ids(app: Appliance, ids: set[str]) -> dict[str, set[str]]:
    found = {}
    for node in app.node_names():
        conn = sqlite3.connect(f"{app.db(node).as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            found[node] = {row[0] for row in conn.execute("SELECT id FROM items") if row[0] in ids}
        finally:
            conn.close()
    return found


FORGED_IDS = {"forged-body", "forged-subject", "forged-reader"}  # rows the attacks try to plant
CONTROL_IDS = {"control-1", "control-2"}  # n1's genuine rows, published before and after them


async def forge_origins(url: str, n1: tuple[str, str], reader: tuple[str, str], payload=change_payload) -> dict[str, str]:
    """As n1 (id 1): a control message in its own name, then origin 2 in the body on its own
    subject token (the servers store it; receivers must refuse it), then n2's token; as the
    reader: n3's token; last, a second control message (once it is applied, every message
    before it in the stream was handled). Returns why the two on foreign tokens were refused."""
    n1_errors: list[str] = []
    reader_errors: list[str] = []
    n1_nc = await connect_as(url, *n1, n1_errors)
    reader_nc = await connect_as(url, *reader, reader_errors)
    try:
        n1_js, reader_js = n1_nc.jetstream(timeout=3), reader_nc.jetstream(timeout=3)
        await n1_js.publish(f"{SUBJECT}.1", payload(1, "control-1"), stream=STREAM)
        await n1_js.publish(f"{SUBJECT}.1", payload(2, "forged-body"), stream=STREAM)
        why = {
            "n1 on n2's token": await refused(
                lambda: n1_js.publish(f"{SUBJECT}.2", payload(2, "forged-subject"), stream=STREAM), n1_errors
            ),
            "reader on n3's token": await refused(
                lambda: reader_js.publish(f"{SUBJECT}.3", payload(3, "forged-reader"), stream=STREAM), reader_errors
            ),
        }
        await n1_js.publish(f"{SUBJECT}.1", payload(1, "control-2"), stream=STREAM)
        return why
    finally:
        await n1_nc.close()
        await reader_nc.close()


def test_forged_messages_never_reach_a_database(applied: Appliance):
    """n1's identity publishing in n2's name (on n2's subject token, or on its own token with
    origin 2 in the body), and the reader's identity publishing anything: nothing of it lands in
    any database. Before per-node identities every holder of the one credential could do both.
    A control message in n1's own name, built the same way, is applied everywhere."""
    url = client_url(applied)
    attack = forge_origins(url, applied.credentials("n1"), applied.reader_credentials())
    why = asyncio.run(asyncio.wait_for(attack, 60))
    for attempt, reason in why.items():
        assert "permissions violation" in reason.lower(), f"{attempt}: {reason}"
    # The control messages are applied on n2 and n3, so every message between them was handled.
    deadline = time.monotonic() + 90
    while True:
        found = rows_with_ids(applied, CONTROL_IDS | FORGED_IDS)
        if all(found[node] >= CONTROL_IDS for node in ("n2", "n3")):
            break
        assert time.monotonic() < deadline, f"the control messages were not applied: {found}"
        time.sleep(0.3)
    assert all(not (ids - CONTROL_IDS) for ids in found.values()), found
    for node in ("n2", "n3"):
        _, body = applied.http(node, "/health")  # 503 is fine: n1 lacks the control row it never wrote
        assert json.loads(body)["dead_letters"] >= 1, body


def test_no_identity_may_purge_or_delete_the_streams(applied: Appliance):
    identities = {"n2": applied.credentials("n2"), "reader": applied.reader_credentials()}

    async def attack() -> dict:
        reasons = {}
        for who, (user, password) in identities.items():
            errors: list[str] = []
            nc = await connect_as(client_url(applied), user, password, errors)
            try:
                js = nc.jetstream(timeout=3)
                reasons[f"{who} purge"] = await refused(lambda: js.purge_stream(STREAM), errors)
                reasons[f"{who} delete"] = await refused(lambda: js.delete_stream(STREAM), errors)
                info = await settled(lambda: js.stream_info(STREAM))
                assert info.state.messages > 0, who
            finally:
                await nc.close()
        return reasons

    reasons = asyncio.run(asyncio.wait_for(attack(), 60))
    for attempt, reason in reasons.items():
        assert "permissions violation" in reason.lower(), f"{attempt}: {reason}"


def test_reader_identity_reads_the_feed_but_cannot_write_snapshots(applied: Appliance):
    """The README's feed example failed with "Authorization Violation" against the quick-start
    cluster: it now works with the reader credentials apply writes out (0600), and so does
    `watch --spec`. The reader may not touch the snapshot bucket or its lease."""
    from marmot_appliance.feed import changes

    reader_file = applied.state_dir / "secrets" / "nats-reader.json"
    assert stat.S_IMODE(reader_file.stat().st_mode) == 0o600
    write_rows(applied.db("n2"), "reader-check", 1)
    url = client_url(applied)

    async def read_one_and_attack() -> tuple[str, str]:
        feed = changes(url, "marmot-changes", shards=1, from_="start", tables=["items"], credentials=reader_file)
        async for change in feed:
            if change.pk == ("reader-check-0",):
                seen = change.origin
                break
        await feed.aclose()
        user, password = applied.reader_credentials()
        errors: list[str] = []
        nc = await connect_as(client_url(applied), user, password, errors)
        try:
            js = nc.jetstream(timeout=3)
            why = await refused(
                lambda: js.publish("$O.marmot-changes-snapshots.M.Zm9yZ2Vk", b"{}", stream="OBJ_marmot-changes-snapshots"),
                errors,
            )
            lease = await refused(lambda: js.publish("$KV.marmot-changes-snapshots-lease.save", b"{}"), errors)
        finally:
            await nc.close()
        return f"{seen}", why + lease

    origin, why = asyncio.run(asyncio.wait_for(read_one_and_attack(), 90))
    assert origin == "2"
    assert "permissions violation" in why.lower(), why

    from tests.test_appliance_support import cli_runner

    runner = cli_runner()
    import os
    import subprocess

    watch = subprocess.Popen(
        [*runner.prefix, runner.python, "-m", "marmot_appliance", "watch", "--spec", str(applied.spec), "--from", "start"],
        cwd=applied.workdir, env={**os.environ, **dict(runner.env), "HOME": str(applied.workdir)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "reader-check-0" not in line:
            assert time.monotonic() < deadline and watch.poll() is None, watch.stderr.read() if watch.poll() else line
            line = watch.stdout.readline()
    finally:
        watch.terminate()
        watch.wait(timeout=20)


def test_verify_runs_with_the_reader_identity(applied: Appliance):
    """`verify SPEC` connects as the read-only reader: its requests are allowed, and the nodes
    answer through allow_responses (no node may publish on _INBOX.> in general). (`sessions`
    only: the forged-message test leaves `items` rows in n1's name that n1 itself never wrote.)"""
    conn = sqlite3.connect(applied.db("n3"), timeout=30)
    with conn:
        conn.execute("INSERT INTO sessions VALUES ('verify-check', 'n3')")
    conn.close()
    deadline = time.monotonic() + 90
    while True:
        result = applied.cli("verify", str(applied.spec), "--table", "sessions")
        if result.returncode == 0 and "Traceback" not in result.stderr:
            break
        assert time.monotonic() < deadline, describe(result)
        time.sleep(1)


def test_continuous_convergence_check_runs_as_each_node(applied: Appliance):
    """Every node asks the others for digests with its own identity (verify requests) and they
    answer (allow_responses): rounds end converged or diverged, never all undecided."""
    deadline = time.monotonic() + 90
    while True:
        _, raw = applied.http("n2", "/metrics")
        decided = [line for line in raw.decode().splitlines()
                   if line.startswith("marmot_verify_checks_total") and 'result="undecided"' not in line
                   and 'result="error"' not in line and not line.endswith(" 0.0")]
        if decided:
            break
        assert time.monotonic() < deadline, raw.decode()[-3000:]
        time.sleep(1)
