"""The spec's `schema:` files (docs/schema.md): checked by SQLite with located errors, compared
with real database files, and migrated additively in one transaction. Real SQLite files, the
real CLI; no NATS needed here (tests/test_schema_rollout.py runs the cluster)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from marmot_appliance.schema.migrate import (
    SchemaMigrationError,
    migrate_database,
    plan_database,
)
from tests.schema_support import assert_refused_unchanged, declare, make_db, schema_rows

SPEC = """\
apiVersion: marmot-appliance/v1
kind: Cluster
name: demo
schema: [schema.sql, more.sql, missing.sql]
nodes:
  - {name: n1, id: 1, host: 127.0.0.1, db: data/n1.db}
"""
SCHEMA_SQL = """\
-- tables
CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT);
CREATE TABLE orders (id TEXT PRIMARY KEY,, total REAL);
INSERT INTO notes VALUES ('a', 'b');
CREATE INDEX notes_body ON notes (body);
"""
MORE_SQL = """\
CREATE TEMP TABLE scratch (x);
CREATE TRIGGER notes_touch AFTER UPDATE ON notes BEGIN
  UPDATE notes SET body = trim(NEW.body) WHERE id = NEW.id;
END;
CREATE TABLE _marmot_mine (id TEXT PRIMARY KEY);
CREATE TABLE broken (id TEXT PRIMARY KEY, note 'unterminated);
"""


def _validate(workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "marmot_appliance", "validate", "cluster.yaml"],
        cwd=workdir, capture_output=True, text=True, timeout=120,
    )


def test_validate_locates_every_mistake_in_the_sql_files(tmp_path):
    (tmp_path / "cluster.yaml").write_text(SPEC)
    (tmp_path / "schema.sql").write_text(SCHEMA_SQL)
    (tmp_path / "more.sql").write_text(MORE_SQL)
    result = _validate(tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"cluster.yaml:4:32: $.schema[2]: {tmp_path}/missing.sql: no such file",
        "more.sql:1:1: CREATE TEMP not allowed: a temporary object lives in one connection only; declare it without TEMP",
        "more.sql:5:1: '_marmot_mine': names starting with '_marmot_' are reserved for replication bookkeeping",
        "more.sql:6:1: incomplete statement (unterminated string, comment or trigger body?)",
        'schema.sql:3:42: near ",": syntax error',
        "schema.sql:4:1: INSERT statement not allowed: schema files hold only CREATE TABLE, INDEX, VIEW and TRIGGER",
    ]


def test_validate_accepts_good_files_and_a_last_statement_without_semicolon(tmp_path):
    (tmp_path / "cluster.yaml").write_text(SPEC.replace(", more.sql, missing.sql", ""))
    (tmp_path / "schema.sql").write_text(
        "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT DEFAULT 'a;b');\n"
        "CREATE VIEW shown AS SELECT id FROM notes /* ; */;\n"
        "CREATE UNIQUE INDEX notes_body ON notes (body)"
    )
    result = _validate(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid (cluster 'demo', 1 node)" in result.stdout


def test_plan_and_migrate_are_additive_and_keep_the_rows(tmp_path):
    db = make_db(tmp_path / "n.db", "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)",
                 "INSERT INTO notes VALUES ('x', 'kept')")
    declared = declare(tmp_path, (
        "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, tag TEXT NOT NULL DEFAULT 'none', n INTEGER);\n"
        "CREATE TABLE orders (id TEXT PRIMARY KEY, total REAL);\n"
        "CREATE INDEX notes_by_tag ON notes (tag);\n"
        "CREATE VIEW tagged AS SELECT id, tag FROM notes;\n"
    ))
    assert [c.render() for c in plan_database(declared, db)] == [
        "+ table orders", "+ column notes.tag", "+ column notes.n", "+ index notes_by_tag", "+ view tagged",
    ]
    result = migrate_database(db, declared)
    assert len(result.applied) == 5 and not result.skipped
    assert plan_database(declared, db) == []
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT * FROM notes").fetchall() == [("x", "kept", "none", None)]
    conn.close()


def test_incompatible_changes_are_refused_and_nothing_changes(tmp_path):
    db = make_db(tmp_path / "n.db", "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, old TEXT)",
                 "INSERT INTO notes VALUES ('x', 'kept', 'o')")
    declared = declare(tmp_path, (
        "CREATE TABLE notes (id TEXT PRIMARY KEY, body INTEGER, must TEXT NOT NULL);\n"
        "CREATE TABLE orders (id TEXT PRIMARY KEY);\n"
    ))
    assert [c.render() for c in plan_database(declared, db)] == [
        "+ table orders",
        "! column notes.body: type change TEXT -> INTEGER not supported (needs a manual migration)",
        "! column notes.must: a NOT NULL column needs a non-NULL DEFAULT to be added to an existing table "
        "(needs a manual migration)",
        "! column notes.old: in the database but not in the schema files: dropping or renaming a column is "
        "not supported (needs a manual migration)",
    ]
    assert_refused_unchanged(db, declared, "incompatible schema changes; nothing was changed")
    result = migrate_database(db, declared, skip_incompatible=True)
    assert [c.render() for c in result.applied] == ["+ table orders"]
    assert len(result.skipped) == 3
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT * FROM notes").fetchall() == [("x", "kept", "o")]  # nothing dropped
    conn.close()


def test_a_failing_statement_rolls_back_the_whole_migration(tmp_path):
    db = make_db(tmp_path / "n.db", "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)",
                 "INSERT INTO notes VALUES ('a', 'same')", "INSERT INTO notes VALUES ('b', 'same')")
    declared = declare(tmp_path, (
        "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT);\n"
        "CREATE TABLE orders (id TEXT PRIMARY KEY);\n"
        "CREATE UNIQUE INDEX one_body ON notes (body);\n"
    ))
    # orders was not left behind
    assert_refused_unchanged(db, declared, "index one_body failed, nothing was changed: UNIQUE constraint",
                             SchemaMigrationError)


def test_changed_index_is_recreated_and_undeclared_objects_are_kept(tmp_path):
    db = make_db(tmp_path / "n.db", "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, tag TEXT)",
                 "CREATE INDEX notes_i ON notes (body)", "CREATE TABLE app_own (k PRIMARY KEY)",
                 "CREATE INDEX app_idx ON notes (tag)")
    declared = declare(tmp_path, (
        "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, tag TEXT);\nCREATE INDEX notes_i ON notes (tag, body);\n"
    ))
    assert [c.render() for c in plan_database(declared, db)] == [
        "~ index notes_i: definition changed: re-created",
        "? table app_own: not in the schema files (kept)",
        "? index app_idx: not in the schema files (kept)",
    ]
    migrate_database(db, declared)
    rows = {name: sql for _type, name, sql in schema_rows(db)}
    assert rows["notes_i"] == "CREATE INDEX notes_i ON notes (tag, body)"
    assert "app_own" in rows and "app_idx" in rows


def _cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marmot_appliance", *args], cwd=workdir,
                          capture_output=True, text=True, timeout=120)


def test_schema_command_plans_and_applies_one_node_as_the_role_does(tmp_path):
    """`schema plan|apply --db --schema` (what the Ansible role runs on each host), and the
    spec form with --node."""
    (tmp_path / "notes.sql").write_text("CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, tag TEXT DEFAULT 'x');\n")
    (tmp_path / "cluster.yaml").write_text(SPEC.replace("[schema.sql, more.sql, missing.sql]", "[notes.sql]"))
    (tmp_path / "data").mkdir()
    db = make_db(tmp_path / "data" / "n1.db", "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)")
    planned = _cli(tmp_path, "schema", "plan", "--detailed-exitcode", "--db", str(db), "--schema", "notes.sql",
                   "--node", "n1")
    assert planned.returncode == 2, planned.stderr
    assert planned.stdout == "schema of node n1:\n  + column notes.tag\n"
    applied = _cli(tmp_path, "schema", "apply", "cluster.yaml", "--node", "n1")
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == "schema of node n1: + column notes.tag\n"
    again = _cli(tmp_path, "schema", "plan", "--detailed-exitcode", "cluster.yaml")
    assert (again.returncode, again.stdout) == (0, "schema of node n1: no changes\n")
    (tmp_path / "notes.sql").write_text("CREATE TABLE notes (id TEXT PRIMARY KEY, body BLOB, tag TEXT DEFAULT 'x');\n")
    refused = _cli(tmp_path, "schema", "apply", "cluster.yaml")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "! column notes.body: type change TEXT -> BLOB not supported" in refused.stderr
    missing = _cli(tmp_path, "schema", "apply", "--db", str(tmp_path / "nope.db"), "--schema", "notes.sql")
    assert missing.returncode == 1 and "no database at" in missing.stderr
    assert not (tmp_path / "nope.db").exists()


def test_hosts_get_the_spec_with_their_copies_of_the_schema_files(tmp_path):
    from marmot_appliance.deploy.inventory import inventory_for
    from marmot_appliance.spec.loader import load_cluster

    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "notes.sql").write_text("CREATE TABLE notes (id TEXT PRIMARY KEY);\n")
    (tmp_path / "orders.sql").write_text("CREATE TABLE orders (id TEXT PRIMARY KEY);\n")
    spec = tmp_path / "cluster.yaml"
    spec.write_text(
        "apiVersion: marmot-appliance/v1\nkind: Cluster\nname: lab\nschema: [sql/notes.sql, orders.sql]\n"
        "nodes:\n  - {name: n1, id: 1, host: 10.77.0.11, db: /var/lib/app/app.db}\n"
    )
    variables = inventory_for(load_cluster(spec)).group_vars["all"]
    assert variables["marmot_node_schema_files"] == [
        {"src": str(tmp_path / "sql" / "notes.sql"), "dest": "/etc/marmot-appliance/schema/01-notes.sql"},
        {"src": str(tmp_path / "orders.sql"), "dest": "/etc/marmot-appliance/schema/02-orders.sql"},
    ]
    assert variables["marmot_node_cluster_spec"]["schema"] == [
        "/etc/marmot-appliance/schema/01-notes.sql", "/etc/marmot-appliance/schema/02-orders.sql",
    ]


def test_without_a_declared_schema_plan_names_tables_that_differ_between_nodes(tmp_path):
    """Applications that manage their own schema: nothing is planned for it, but a table one
    node lacks, or has in another shape (DDL run by hand), is named per node."""
    from marmot_appliance.appliance.schema_rollout import database_drift, plan_schema
    from marmot_appliance.spec.loader import load_cluster

    (tmp_path / "cluster.yaml").write_text(
        "apiVersion: marmot-appliance/v1\nkind: Cluster\nname: own\nnodes:\n" + "".join(
            f"  - {{name: n{i}, id: {i}, host: 127.0.0.1, db: n{i}.db, ports: {{client: {4400 + i}, "
            f"cluster: {4410 + i}, monitor: {4420 + i}, metrics: {4430 + i}}}}}\n" for i in (1, 2, 3)
        )
    )
    app = "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)"
    make_db(tmp_path / "n1.db", app, "CREATE TABLE legacy (k TEXT PRIMARY KEY)")
    make_db(tmp_path / "n2.db", app)
    make_db(tmp_path / "n3.db", "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, extra INTEGER)")
    cluster = load_cluster(tmp_path / "cluster.yaml")
    assert plan_schema(cluster) == {}
    assert database_drift(cluster) == {
        "n1": ["table legacy: only here (missing on n2, n3)"],
        "n3": ["table notes: differs from the other nodes"],
    }
