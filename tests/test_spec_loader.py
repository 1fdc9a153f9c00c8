"""Loading specs: defaults, located errors, YAML 1.1 pitfalls, duplicate keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from marmot_appliance.errors import SpecError
from marmot_appliance.spec.loader import load_cluster, load_cluster_text
from marmot_appliance.spec.model import NatsAuth, NodePorts
from tests.spec_helpers import EXAMPLES, MINIMAL, problems_of, single_problem

LOCATED = re.compile(r"^spec\.yaml:(\d+):(\d+): \$[^:]*: .+")


def test_local_example_loads_with_resolved_paths_and_per_node_ports():
    cluster = load_cluster(EXAMPLES / "local-3-node.yaml")
    assert cluster.name == "local"
    assert [n.name for n in cluster.nodes] == ["n1", "n2", "n3"]
    assert [n.id for n in cluster.nodes] == [1, 2, 3]
    assert cluster.is_local and cluster.nats.embedded
    assert cluster.replication.shards == 1
    assert cluster.nodes[0].db == str(EXAMPLES / "data" / "n1.db")
    assert cluster.nodes[1].ports == NodePorts(client=4223, cluster=6223, monitor=8223, metrics=9471)
    assert cluster.source == (EXAMPLES / "local-3-node.yaml").absolute()
    assert cluster.effective_log_replicas == 3


def test_lab_example_loads():
    cluster = load_cluster(EXAMPLES / "lab-3-host.yaml")
    assert [n.host for n in cluster.nodes] == ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
    assert all(n.db.startswith("/") for n in cluster.nodes)
    assert not cluster.is_local
    assert cluster.replication.log_replicas == 3


def test_minimal_spec_gets_every_default():
    cluster = load_cluster_text(MINIMAL)
    node = cluster.nodes[0]
    assert node.advertise == node.host == "10.0.0.1"
    assert node.ports == NodePorts()
    assert node.publish and node.replicate and node.seq_map_path is None
    assert cluster.nats.auth == NatsAuth(mode="generated", user="marmot")
    assert cluster.replication.max_log_entries == 100_000
    assert cluster.replication.batch.max_rows == 500
    assert cluster.snapshots.every_entries == 50_000
    assert cluster.source is None


def test_cluster_level_ports_and_node_overrides_combine():
    text = MINIMAL + "nats: {client_port: 5222, monitor_port: 9000}\nobservability: {metrics_port: 9999}\n"
    text = text.replace("db: /srv/app.db}\n  - {name: n2", "db: /srv/app.db, ports: {client: 5333}}\n  - {name: n2", 1)
    cluster = load_cluster_text(text)
    assert cluster.nodes[0].ports == NodePorts(client=5333, cluster=6222, monitor=9000, metrics=9999)
    assert cluster.nodes[1].ports == NodePorts(client=5222, cluster=6222, monitor=9000, metrics=9999)


def test_auth_shorthand_and_object_forms():
    assert load_cluster_text(MINIMAL + "nats: {auth: none}\n").nats.auth.mode == "none"
    auth = load_cluster_text(MINIMAL + "nats: {auth: {mode: user, user: app, password_file: /etc/pw}}\n").nats.auth
    assert auth == NatsAuth(mode="user", user="app", password_file="/etc/pw")


def test_relative_db_of_local_node_resolves_against_base_dir(tmp_path: Path):
    # a mixed local/remote cluster is refused, so make every node local with its own ports
    text = (
        "apiVersion: marmot-appliance/v1\nkind: Cluster\nname: shop\nnodes:\n"
        "  - {name: n1, id: 1, host: 127.0.0.1, db: data/./x/app.db}\n"
    )
    cluster = load_cluster_text(text, "inline", base_dir=tmp_path)
    assert cluster.nodes[0].db == str(tmp_path / "data" / "x" / "app.db")


def test_numbers_given_as_ints_become_model_floats_and_strings():
    text = MINIMAL + "nats: {connect_timeout_s: 7, jetstream: {max_memory: 1073741824}}\n"
    cluster = load_cluster_text(text)
    assert cluster.nats.connect_timeout_s == 7.0 and isinstance(cluster.nats.connect_timeout_s, float)
    assert cluster.nats.jetstream.max_memory == "1073741824"


def test_invalid_example_reports_every_mistake_located_and_sorted():
    with pytest.raises(SpecError) as caught:
        load_cluster(EXAMPLES / "invalid.yaml")
    problems = caught.value.problems
    joined = "\n".join(problems)
    assert len(problems) >= 6, joined
    positions = []
    for problem in problems:
        match = re.match(r"^(.+invalid\.yaml):(\d+):(\d+): \$\S*: .+", problem)
        assert match, problem
        positions.append((int(match.group(2)), int(match.group(3))))
    assert positions == sorted(positions)
    for expected in (
        "$.name: ambiguous YAML 1.1 value 'no'",
        "$.replication.shards: expected integer",
        "$.replication.log_replicas: 5 replicas",
        "$.nats.client_prot: unknown property 'client_prot' (did you mean 'client_port'?)",
        "$.nodes[1].id: duplicate node id 1",
        "$.nodes[2].db: duplicate key 'db'",
        "$.nodes[2].db: 'data/app.db' must be an absolute path",
    ):
        assert expected in joined, (expected, joined)


def test_problems_sort_by_line_numerically():
    # Mistakes on lines 6 and 12: a plain string sort would put 12 first.
    text = MINIMAL + "nats: {client_port: x}\n" + "\n" * 5 + "deploy: {ssh_user: 5}\n"
    lines = [int(p.split(":")[1]) for p in problems_of(text)]
    assert lines == sorted(lines) and lines[-1] >= 10


@pytest.mark.parametrize(
    "value, read_as",
    [("no", "boolean false"), ("on", "boolean true"), ("yes", "boolean true"), ("off", "boolean false"),
     ("123", "integer 123"), ("2024-01-01", "date 2024-01-01"), ("1.5", "number 1.5")],
)
def test_yaml11_scalars_where_a_string_is_expected_say_quote_it(value, read_as):
    problem = single_problem(MINIMAL.replace("name: shop", f"name: {value}"))
    assert LOCATED.match(problem)
    assert problem.startswith("spec.yaml:3:7: $.name: ")
    assert f"ambiguous YAML 1.1 value '{value}' (read as {read_as})" in problem
    assert "quote it" in problem


def test_quoted_yaml11_words_are_fine_strings():
    cluster = load_cluster_text(MINIMAL + 'deploy: {ssh_user: "no"}\n')
    assert cluster.deploy.ssh_user == "no"


@pytest.mark.parametrize("text, number", [("0640", 416), ("1:30", 90), ("04222", 2194)])
def test_yaml11_numbers_are_refused_even_where_a_number_is_expected(text, number):
    problem = single_problem(MINIMAL + f"nats: {{client_port: {text}}}\n")
    assert problem.startswith("spec.yaml:8:21: $.nats.client_port: ")
    assert f"ambiguous YAML 1.1 value '{text}'" in problem and str(number) in problem


def test_octal_port_advice_is_one_that_validates():
    """The message's suggestion for `client_port: 04222` is accepted when followed."""
    problem = single_problem(MINIMAL + "nats: {client_port: 04222}\n")
    assert "write 4222 for the decimal number" in problem
    assert load_cluster_text(MINIMAL + "nats: {client_port: 4222}\n").nats.client_port == 4222


@pytest.mark.parametrize("written", ["name: no", "name: 2024-01-01", "name: 123"])
def test_spec_doc_messages_are_the_loader_s(written):
    """docs/spec.md's table of YAML 1.1 surprises quotes each message as the loader prints it."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "spec.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith(f"| `{written}`"))
    documented = row.rstrip(" |").rsplit("| `", 1)[1].rstrip("`")
    problem = single_problem(MINIMAL.replace("name: shop", written))
    assert problem.endswith(f"$.name: {documented}"), problem


def test_yaml11_octal_where_a_string_is_expected():
    problem = single_problem(MINIMAL + "deploy: {ssh_user: 0640}\n")
    assert "$.deploy.ssh_user: ambiguous YAML 1.1 value '0640'" in problem


def test_ambiguous_value_in_auth_shorthand():
    problem = single_problem(MINIMAL + "nats: {auth: no}\n")
    assert "$.nats.auth: ambiguous YAML 1.1 value 'no'" in problem


def test_empty_value_where_string_expected():
    problem = single_problem(MINIMAL + "deploy:\n  install_dir:\n")
    assert problem.startswith("spec.yaml:9:15: $.deploy.install_dir: empty value")


def test_duplicate_keys_are_located_at_the_second_key():
    text = MINIMAL + "replication:\n  shards: 2\n  shards: 3\n"
    problem = single_problem(text)
    assert problem == "spec.yaml:10:3: $.replication.shards: duplicate key 'shards' (first defined at line 9, column 3)"


def test_duplicate_top_level_key():
    problem = single_problem(MINIMAL + "name: other\n")
    assert problem.startswith("spec.yaml:8:1: $.name: duplicate key 'name'")


def test_unsupported_api_version_short_circuits_and_lists_supported():
    text = MINIMAL.replace("marmot-appliance/v1", "marmot-appliance/v9") + "bogus: 1\n"
    problem = single_problem(text)
    assert problem == "spec.yaml:1:13: $.apiVersion: unsupported apiVersion 'marmot-appliance/v9'; supported: marmot-appliance/v1"


def test_kind_must_be_cluster():
    problem = single_problem(MINIMAL.replace("kind: Cluster", "kind: Deployment"))
    assert problem.startswith("spec.yaml:2:7: $.kind: must be 'Cluster'")


def test_missing_required_properties_all_reported():
    problems = problems_of("apiVersion: marmot-appliance/v1\nkind: Cluster\n")
    assert problems == [
        "spec.yaml:1:1: $: missing required property 'name'",
        "spec.yaml:1:1: $: missing required property 'nodes'",
    ]


def test_missing_node_field_points_at_the_node():
    problem = single_problem(MINIMAL.replace(", db: /srv/app.db}\n  - {name: n2", "}\n  - {name: n2", 1))
    assert problem == "spec.yaml:5:5: $.nodes[0]: missing required property 'db'"


def test_unknown_keys_point_at_the_key_with_a_suggestion():
    problem = single_problem(MINIMAL + "replication:\n  shards: 1\n  max_log_entrys: 5\n")
    assert problem == (
        "spec.yaml:10:3: $.replication.max_log_entrys: unknown property 'max_log_entrys' "
        "(did you mean 'max_log_entries'?)"
    )


def test_on_as_a_key_is_the_string_on():
    problem = single_problem(MINIMAL + "on: 1\n")
    assert "$.on: unknown property 'on'" in problem


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("replication: {shards: 0}", "$.replication.shards: 0 is less than the minimum of 1"),
        ("observability: {log_level: loud}", "$.observability.log_level: must be one of 'debug', 'info', 'warning', 'error'"),
        ("nats: {embedded: false, urls: [http://x]}", "$.nats.urls[0]: 'http://x' is not valid: a nats://"),
        ("replication: {stream_prefix: a.b}", "$.replication.stream_prefix: 'a.b' is not valid: letters, digits"),
        ("nats: {tls: {cert: /c}}", "$.nats.tls: missing required property 'key'"),
        ("nats: {auth: bogus}", "$.nats.auth: must be one of 'generated', 'none'"),
        ("nats: {auth: {mode: user, password_file: /p, extra: 1}}", "$.nats.auth.extra: unknown property 'extra'"),
        ("snapshots: {keep: 1.5}", "$.snapshots.keep: expected integer, got number 1.5"),
        ("deploy: {become: 1}", "$.deploy.become: expected boolean, got integer 1"),
    ],
)
def test_schema_errors_are_located_and_readable(snippet, expected):
    problem = single_problem(MINIMAL + snippet + "\n")
    assert problem.startswith("spec.yaml:8:"), problem
    assert expected in problem, problem


def test_bad_cluster_and_node_names():
    problems = problems_of(MINIMAL.replace("name: shop", "name: Shop_1").replace("name: n2", "name: -n2"))
    assert len(problems) == 2
    assert "$.name: 'Shop_1' is not valid: lowercase letters" in problems[0]
    assert "$.nodes[1].name: '-n2' is not valid" in problems[1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "spec.yaml: the file is empty"),
        ("# only a comment\n", "spec.yaml: the file is empty"),
        ("a: [1, 2\n", "spec.yaml:2:1: invalid YAML"),
        ("a: 1\n\tb: 2\n", "spec.yaml:2:1: invalid YAML"),
        ("a:\n\t- 1\n", "spec.yaml:2:1: invalid YAML: while scanning for the next token found character '\\t' that cannot start any token (indent with spaces"),
        (MINIMAL + "---\n" + MINIMAL, "spec.yaml:8:1: invalid YAML: expected a single document"),
        ("a: \x07\n", "spec.yaml:1:4: invalid YAML: unacceptable character"),
    ],
)
def test_unusable_yaml_is_one_located_problem(text, expected):
    assert single_problem(text).startswith(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("- a\n- b\n", "spec.yaml:1:1: $: expected object, got an array"),
        ("hello\n", "spec.yaml:1:1: $: expected object, got string 'hello'"),
        ("? [a, b]\n: 1\n", "spec.yaml:1:3: $: mapping keys must be plain strings"),
        ("x: &x {a: 1}\ny:\n  <<: *x\n", "spec.yaml:3:3: $.y: YAML merge keys (<<) are not supported"),
        ("x: !!set {a, b}\n", "spec.yaml:1:4: $.x: unsupported YAML tag"),
        ("x: !custom 1\n", "spec.yaml:1:4: $.x: cannot read value '1'"),
        ("x: 2001-13-45\n", "spec.yaml:1:4: $.x: cannot read value '2001-13-45'"),
        ("a: &a [*a]\n", "spec.yaml:1:4: $.a[0]: nested too deeply (or a recursive alias)"),
    ],
)
def test_odd_yaml_is_reported_not_crashed_on(text, expected):
    problems = problems_of(text)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_alias_bomb_is_refused():
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in "bcdef":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 10) + "]")
    problem = single_problem("\n".join(lines) + "\n")
    assert "document too large" in problem


def test_deep_nesting_is_refused():
    assert "nested too deeply" in "\n".join(problems_of("a: " + "[" * 2000 + "]" * 2000 + "\n"))
    assert "nested too deeply" in "\n".join(problems_of("a: " + "[" * 100 + "]" * 100 + "\n"))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp / "missing.yaml", "missing.yaml: no such file"),
        (lambda tmp: tmp, ": is a directory, expected a YAML file"),
    ],
)
def test_file_problems(tmp_path, make, expected):
    with pytest.raises(SpecError) as caught:
        load_cluster(make(tmp_path))
    assert caught.value.problems[0].endswith(expected)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(MINIMAL.replace("shop", "sh\xf6p").encode("latin-1"))
    with pytest.raises(SpecError) as caught:
        load_cluster(path)
    assert "not UTF-8 text" in caught.value.problems[0]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_cluster(path).name == "shop"


# -- paths and hosts that reach unit files, commands, chowns and Ansible --------------------------

_PATH_KEYS = {
    "db": lambda v: MINIMAL.replace("db: /srv/app.db}", f"db: {v}}}", 1),
    "store_dir": lambda v: MINIMAL + f"nats: {{jetstream: {{store_dir: {v}}}}}\n",
    "state_dir": lambda v: MINIMAL + f"deploy: {{state_dir: {v}}}\n",
    "install_dir": lambda v: MINIMAL + f"deploy: {{install_dir: {v}}}\n",
    "seq_map_path": lambda v: MINIMAL.replace("db: /srv/app.db}", f"db: /srv/app.db, seq_map_path: {v}}}", 1),
    "tls.cert": lambda v: MINIMAL + f"nats: {{tls: {{cert: {v}, key: /etc/k.pem}}}}\n",
}


@pytest.mark.parametrize("key", sorted(_PATH_KEYS))
@pytest.mark.parametrize(
    "bad",
    [
        '"/srv/app.db\\nExecStartPre=+/bin/sh -c id"',  # a newline used to render a root ExecStartPre
        "/srv/../etc/shadow",
        '"/srv/%h.db"',  # a systemd specifier
        '"/srv/$HOME.db"',
        '"/srv/{{ lookup(\'pipe\', \'id\') }}.db"',  # an Ansible template
        '"/srv/a b.db"',
        '"/srv/a\\tb.db"',
    ],
)
def test_paths_refuse_what_could_escape_into_units_commands_or_templates(key: str, bad: str):
    problems = problems_of(_PATH_KEYS[key](bad))
    assert any("is not valid: a path without whitespace" in p for p in problems), problems


def test_plain_absolute_paths_still_load():
    cluster = load_cluster_text(_PATH_KEYS["store_dir"]("/var/lib/shop-nats_1/js.d"))
    assert cluster.nats.jetstream.store_dir == "/var/lib/shop-nats_1/js.d"


def test_hosts_are_names_or_addresses_only():
    problems = problems_of(MINIMAL.replace("host: 10.0.0.1", "host: \"{{lookup('pipe','id')}}\""))
    assert any("a host name or IP address" in p for p in problems), problems
    assert load_cluster_text(MINIMAL.replace("host: 10.0.0.1", "host: '[fd00::1]'")).nodes[0].host == "[fd00::1]"
