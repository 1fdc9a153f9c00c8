"""Shared fixtures: real nats-servers and real SQLite databases."""

from __future__ import annotations

import os

import pytest

from tests.harness import NatsCluster, make_wal_db


def lab_required() -> bool:
    """CI sets MARMOT_REQUIRE_LAB=1: tests needing root or the lab must run, never skip."""
    return os.environ.get("MARMOT_REQUIRE_LAB") == "1"


def skip_or_fail(reason: str) -> None:
    if lab_required():
        pytest.fail(f"MARMOT_REQUIRE_LAB=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def nats_server(tmp_path_factory):
    """One JetStream-enabled nats-server on a free 127.0.0.1 port."""
    cluster = NatsCluster(root=tmp_path_factory.mktemp("nats1"))
    try:
        yield cluster.start(1)
    finally:
        cluster.stop()


@pytest.fixture
def nats_cluster(tmp_path_factory):
    """A 3-server JetStream cluster on free 127.0.0.1 ports, meta leader elected."""
    cluster = NatsCluster(root=tmp_path_factory.mktemp("nats3"))
    try:
        yield cluster.start(3)
    finally:
        cluster.stop()


@pytest.fixture
def wal_db(tmp_path):
    """Factory: wal_db(name, schema_sql) -> Path of a fresh WAL-mode database."""

    def factory(name: str = "app.db", schema: str = ""):
        return make_wal_db(tmp_path / name, schema)

    return factory


@pytest.fixture(scope="session")
def vagrant_lab(tmp_path_factory):
    """The lab of vagrant/cluster.yaml's three hosts, brought up once for every lab module whose
    cluster fits on them (tests/test_lab_deploy.py, then tests/test_lab_schema.py on the same
    hosts with the packages already installed); `lab down` at the end of the session, or by
    tests/test_lab_schema.py's last test, which checks that nothing is left behind."""
    from tests.test_lab_deploy import SPEC, lab_for

    yield from lab_for(SPEC, tmp_path_factory)
