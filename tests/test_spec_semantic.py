"""Rules the schema cannot express: uniqueness, port clashes, replicas, NATS mode, auth, paths."""

from __future__ import annotations

import pytest

from marmot_appliance.spec.loader import load_cluster_text
from tests.spec_helpers import MINIMAL, problems_of, single_problem

LOCAL_HEAD = "apiVersion: marmot-appliance/v1\nkind: Cluster\nname: shop\n"


def test_duplicate_node_names_and_ids_point_at_the_later_node():
    text = MINIMAL.replace("name: n2, id: 2", "name: n1, id: 1")
    assert problems_of(text) == [
        "spec.yaml:6:12: $.nodes[1].name: duplicate node name 'n1' (also nodes[0])",
        "spec.yaml:6:20: $.nodes[1].id: duplicate node id 1 (also nodes[0])",
    ]


def test_nodes_sharing_a_host_without_own_ports_clash_on_every_port():
    text = LOCAL_HEAD + "nodes:\n  - {name: n1, id: 1, host: 127.0.0.1, db: a.db}\n  - {name: n2, id: 2, host: localhost, db: b.db}\n"
    problems = problems_of(text)
    assert len(problems) == 4
    for kind, port in zip(("client", "cluster", "monitor", "metrics"), (4222, 6222, 8222, 9470)):
        expected = (
            f"spec.yaml:6:5: $.nodes[1].ports.{kind}: port {port} ({kind}) on 127.0.0.1 is already used by "
            f"node n1 ({kind}); nodes sharing a host need their own ports: set nodes[1].ports.{kind}"
        )
        assert expected in problems


def test_a_node_port_clashing_with_its_own_other_port():
    problem = single_problem(MINIMAL.replace("db: /srv/app.db}", "db: /srv/app.db, ports: {metrics: 4222}}", 1))
    assert "$.nodes[0].ports.metrics: port 4222 (metrics) on 10.0.0.1 is already used by node n1 (client)" in problem
    assert problem.startswith("spec.yaml:5:")


def test_advertise_address_counts_for_clashes():
    text = MINIMAL.replace("host: 10.0.0.2, db", "host: 10.0.0.2, advertise: 10.0.0.1, db")
    problems = problems_of(text)
    assert any("$.nodes[1].ports.client: port 4222 (client) on 10.0.0.1" in p for p in problems), problems


def test_external_nats_only_checks_the_metrics_port():
    text = (
        LOCAL_HEAD
        + "nats: {embedded: false, urls: ['nats://127.0.0.1:4222']}\n"
        + "nodes:\n  - {name: n1, id: 1, host: 127.0.0.1, db: a.db}\n"
        + "  - {name: n2, id: 2, host: 127.0.0.1, db: b.db, ports: {metrics: 9471}}\n"
    )
    cluster = load_cluster_text(text)
    assert cluster.nats_server_count == 1 and cluster.effective_log_replicas == 1


def test_replicas_must_fit_the_nats_servers():
    problems = problems_of(MINIMAL + "replication: {log_replicas: 4}\nsnapshots: {replicas: 5}\n")
    assert problems == [
        "spec.yaml:8:29: $.replication.log_replicas: 4 replicas but the cluster has only 3 NATS servers",
        "spec.yaml:9:23: $.snapshots.replicas: 5 replicas but the cluster has only 3 NATS servers",
    ]


def test_replicas_count_external_urls():
    text = MINIMAL + "nats: {embedded: false, urls: ['nats://10.0.0.9:4222']}\nreplication: {log_replicas: 2}\n"
    assert "2 replicas but the cluster has only 1 NATS server" in single_problem(text)


def test_external_nats_needs_urls_and_embedded_refuses_them():
    assert "$.nats.embedded: embedded: false needs nats.urls" in single_problem(MINIMAL + "nats: {embedded: false}\n")
    problem = single_problem(MINIMAL + "nats: {urls: ['nats://10.0.0.9:4222']}\n")
    assert "$.nats.urls: urls are only used with embedded: false" in problem


@pytest.mark.parametrize(
    "auth, expected",
    [
        ("{mode: user}", "$.nats.auth: mode 'user' needs password_file"),
        ("{mode: nkey}", "$.nats.auth: mode 'nkey' needs nkey_seed_file"),
        ("{mode: generated, password_file: /p}", "$.nats.auth.password_file: password_file is only used with mode 'user'"),
        ("{mode: user, password_file: /p, nkey_seed_file: /s}", "$.nats.auth.nkey_seed_file: nkey_seed_file is only used with mode 'nkey'"),
    ],
)
def test_auth_mode_and_files_agree(auth, expected):
    assert expected in single_problem(MINIMAL + f"nats: {{auth: {auth}}}\n")


def test_nkey_mode_loads():
    cluster = load_cluster_text(MINIMAL + "nats: {auth: {mode: nkey, nkey_seed_file: /etc/seed.nk}}\n")
    assert cluster.nats.auth.nkey_seed_file == "/etc/seed.nk"


def test_relative_paths_only_for_local_nodes():
    problem = single_problem(MINIMAL.replace("db: /srv/app.db}", "db: srv/app.db}", 1))
    assert problem == (
        "spec.yaml:5:43: $.nodes[0].db: 'srv/app.db' must be an absolute path "
        "(relative paths are only allowed for local nodes)"
    )


def test_cluster_wide_relative_paths_only_when_every_node_is_local(tmp_path):
    remote = MINIMAL + "nats: {tls: {cert: certs/c.pem, key: /k.pem}, jetstream: {store_dir: js}}\n"
    problems = problems_of(remote)
    assert len(problems) == 2
    assert "$.nats.tls.cert: 'certs/c.pem' must be an absolute path" in problems[0]
    assert "$.nats.jetstream.store_dir: 'js' must be an absolute path" in problems[1]
    local = LOCAL_HEAD + "nats: {tls: {cert: certs/c.pem, key: /k.pem}}\nnodes:\n  - {name: n1, id: 1, host: 127.0.0.1, db: a.db, seq_map_path: seq.cbor}\n"
    cluster = load_cluster_text(local, base_dir=tmp_path)
    assert cluster.nats.tls.cert == str(tmp_path / "certs" / "c.pem")
    assert cluster.nodes[0].seq_map_path == str(tmp_path / "seq.cbor")


def test_tilde_is_refused():
    assert "'~' is not expanded" in single_problem(MINIMAL.replace("db: /srv/app.db}", "db: ~/app.db}", 1))


def test_install_dir_must_be_absolute():
    assert "$.deploy.install_dir: 'opt/m' must be an absolute path" in single_problem(MINIMAL + "deploy: {install_dir: opt/m}\n")


def test_two_nodes_on_one_host_cannot_share_a_database():
    text = (
        LOCAL_HEAD + "nodes:\n  - {name: n1, id: 1, host: 127.0.0.1, db: data/a.db}\n"
        "  - {name: n2, id: 2, host: 127.0.0.1, db: ./data/a.db, ports: {client: 1, cluster: 2, monitor: 3, metrics: 4}}\n"
    )
    assert "$.nodes[1].db: database './data/a.db' on 127.0.0.1 is also used by node n1" in single_problem(text)


def test_loopback_nodes_cannot_join_remote_ones():
    text = MINIMAL.replace("host: 10.0.0.3", "host: 127.0.0.1")
    problems = problems_of(text)
    assert any("$.nodes[2].host: loopback address '127.0.0.1' in a cluster with remote nodes" in p for p in problems)


def test_table_both_included_and_excluded():
    text = MINIMAL.replace("db: /srv/app.db}", "db: /srv/app.db, tables: {include: [a, b], exclude: [b]}}", 1)
    assert "$.nodes[0].tables.exclude[0]: table 'b' is both included and excluded" in single_problem(text)


def test_table_names_are_arbitrary_strings():
    text = MINIMAL.replace("db: /srv/app.db}", "db: /srv/app.db, tables: {exclude: ['weird \"name\"', 'on']}}", 1)
    cluster = load_cluster_text(text)
    assert cluster.nodes[0].tables.exclude == ('weird "name"', "on")
    assert not cluster.nodes[0].tables.selects("on") and cluster.nodes[0].tables.selects("other")


def test_semantic_and_schema_problems_are_reported_together():
    text = MINIMAL.replace("name: n2, id: 2", "name: n1, id: 2") + "replication: {shards: many}\n"
    problems = problems_of(text)
    assert len(problems) == 2
    assert "duplicate node name 'n1'" in problems[0] and "$.replication.shards: expected integer" in problems[1]


def test_snapshots_taken_less_often_than_the_log_is_truncated_are_refused():
    text = MINIMAL + "replication: {max_log_entries: 1000}\n"
    problem = single_problem(text)
    assert "$.replication.max_log_entries: snapshots every 50000 entries but the streams keep only 1000" in problem
    explicit = text + "snapshots: {every_entries: 1000}\n"
    assert "$.snapshots.every_entries: snapshots every 1000 entries" in single_problem(explicit)
    assert load_cluster_text(text + "snapshots: {every_entries: 500}\n", "spec.yaml").snapshots.every_entries == 500
    assert load_cluster_text(text + "snapshots: {enabled: false}\n", "spec.yaml").replication.max_log_entries == 1000
