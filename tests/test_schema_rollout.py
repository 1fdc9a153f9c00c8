"""The declared schema end to end (docs/schema.md): real nats-servers, real node runtimes, real
SQLite files, driven through the CLI as an operator would.

A 3-node local cluster is applied from a spec whose `schema:` declares `notes` (no CREATE TABLE
on any node); the README's first example works. Then, while a writer runs on every node, the
schema file gains a column, a table and an index: `plan` lists them per node, `apply` rolls them
out node by node without restarting anything, and the writers start using the new column as soon
as their own node has it (rows for it are parked on the nodes not migrated yet). After the
writers stop every database has the same digest (replication/digest.py), every node reports the
declared fingerprints, a hand-made index on one node is flagged as drift by `status`, and an
incompatible change is refused by `apply` with nothing changed. Every wait polls with a
generous deadline; nothing is timed.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from marmot_appliance.replication.digest import table_digest
from tests.test_appliance_support import chown_tree, describe, make_workdir, run_cli, spec_data, write_spec

pytestmark = pytest.mark.slow

WAIT_S = 120.0
NOTES = "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT);\n"
ROLLOUT = NOTES.replace("body TEXT)", "body TEXT, tag TEXT NOT NULL DEFAULT 'none')") + (
    "CREATE TABLE orders (id TEXT PRIMARY KEY, note_id TEXT, total REAL DEFAULT 0);\n"
    "CREATE INDEX notes_by_tag ON notes (tag);\n"
)


def _wait(predicate, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


def _health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
    except OSError:
        return None


def _columns(db: Path, table: str) -> list[str]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return [row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')]
    finally:
        conn.close()


class Writer(threading.Thread):
    """An application on one node: inserts and updates notes; once its own node has the `tag`
    column (and `orders`), it writes them too, like an application deployed after the migration."""

    def __init__(self, name: str, db: Path):
        super().__init__(name=f"writer-{name}", daemon=True)
        self.node, self.db = name, db
        self.stop = threading.Event()
        self.written = 0
        self.used_new_schema = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = sqlite3.connect(self.db, timeout=30)
        try:
            i = 0
            while not self.stop.is_set():
                i += 1
                migrated = "tag" in [row[1] for row in conn.execute("PRAGMA table_info(notes)")]
                with conn:
                    if migrated:
                        conn.execute(
                            "INSERT INTO notes (id, body, tag) VALUES (?, ?, ?) "
                            "ON CONFLICT (id) DO UPDATE SET body = excluded.body, tag = excluded.tag",
                            (f"{self.node}-{i % 40}", f"{self.node} write {i}", f"t{i % 3}"),
                        )
                        conn.execute("INSERT OR REPLACE INTO orders (id, note_id, total) VALUES (?, ?, ?)",
                                     (f"{self.node}-o{i % 25}", f"{self.node}-{i % 40}", i * 1.5))
                        self.used_new_schema += 1
                    else:
                        conn.execute(
                            "INSERT INTO notes (id, body) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                            (f"{self.node}-{i % 40}", f"{self.node} write {i}"),
                        )
                    # The same shared row from every node: concurrent updates to one key.
                    conn.execute("INSERT OR REPLACE INTO notes (id, body) VALUES ('shared', ?)", (f"{self.node} {i}",))
                self.written += 1
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            conn.close()


def test_declared_schema_rolls_out_under_writes_and_converges():
    workdir = make_workdir()
    data = spec_data()
    data["schema"] = ["schema.sql"]
    data["verify"] = {"interval_s": None}  # the test compares digests itself
    (workdir / "schema.sql").write_text(NOTES)
    spec = write_spec(workdir, data)
    names = [node["name"] for node in data["nodes"]]
    dbs = {node["name"]: workdir / node["db"] for node in data["nodes"]}
    metrics_ports = {node["name"]: node["ports"]["metrics"] for node in data["nodes"]}

    def cli(*args: str):
        return run_cli(workdir, *args)

    try:
        planned = cli("plan", "--detailed-exitcode", spec.name)
        assert planned.returncode == 2, describe(planned)
        for name in names:
            assert f"schema of node {name}:\n    + table notes" in planned.stdout, describe(planned)

        applied = cli("apply", spec.name)
        assert applied.returncode == 0, describe(applied)
        # The README's first example, with no CREATE TABLE on any node.
        conn = sqlite3.connect(dbs["n1"], timeout=30)
        with conn:
            conn.execute("INSERT INTO notes VALUES ('hello', 'from n1')")
        conn.close()
        _wait(lambda: table_digest(dbs["n2"], ["notes"]) == table_digest(dbs["n1"], ["notes"]), "hello on n2")

        writers = [Writer(name, dbs[name]) for name in names]
        for writer in writers:
            writer.start()
        _wait(lambda: all(writer.written > 20 for writer in writers), "every writer to be writing")

        (workdir / "schema.sql").write_text(ROLLOUT)
        chown_tree(workdir)
        planned = cli("plan", spec.name)
        assert planned.returncode == 0, describe(planned)
        for name in names:
            block = planned.stdout.split(f"schema of node {name}:")[1]
            for line in ("+ table orders", "+ column notes.tag", "+ index notes_by_tag"):
                assert line in block, describe(planned)
        assert "0 to restart" in planned.stdout, describe(planned)

        applied = cli("apply", spec.name)
        assert applied.returncode == 0, describe(applied)
        assert "0 restarted" in applied.stdout, describe(applied)  # the runtimes pick it up themselves
        for name in names:
            assert "tag" in _columns(dbs[name], "notes")

        _wait(lambda: all(writer.used_new_schema > 20 for writer in writers), "writers to use the new column")
        for writer in writers:
            writer.stop.set()
        for writer in writers:
            writer.join(timeout=60)
            assert writer.error is None, f"{writer.name}: {writer.error!r}"

        def converged():
            digests = [table_digest(dbs[name]) for name in names]
            return digests if all(d == digests[0] for d in digests) else None

        digests = _wait(converged, "equal digests on every node")
        assert set(digests[0]) == {"notes", "orders"}
        tags = sqlite3.connect(dbs["n3"]).execute("SELECT count(*) FROM notes WHERE tag != 'none'").fetchone()[0]
        assert tags > 0  # rows written with the new column reached every node

        # Every node reports the declared fingerprints; a second plan has nothing left to do.
        def fingerprints():
            reports = [(_health(metrics_ports[name]) or {}).get("schema", {}).get("tables") for name in names]
            return reports if all(r == reports[0] and r and "orders" in r for r in reports) else None

        reported = _wait(fingerprints, "every node to report the new schema")[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_ports['n2']}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        from prometheus_client.parser import text_string_to_metric_families

        (exported,) = [sample.value for family in text_string_to_metric_families(metrics) for sample in family.samples
                       if sample.name == "marmot_schema_table_fingerprint" and sample.labels == {"table": "orders"}]
        assert exported == float(int(reported["orders"][:12], 16))
        status = cli("status", spec.name)
        assert status.returncode == 0 and "schema drift" not in status.stdout, describe(status)
        again = cli("plan", "--detailed-exitcode", spec.name)
        assert again.returncode == 0 and "No changes." in again.stdout, describe(again)

        # DDL by hand on one node: status names the node and the table.
        conn = sqlite3.connect(dbs["n2"], timeout=30)
        conn.execute("CREATE INDEX by_hand ON orders (total)")
        conn.close()
        _wait(lambda: "schema drift" in cli("status", spec.name).stdout, "status to show the drift")
        status = cli("status", spec.name)
        n2_block = status.stdout.split("  n2:")[1].split("  n3:")[0]
        assert "schema drift: table orders: differs from the spec" in n2_block, describe(status)
        assert "schema drift" not in status.stdout.split("  n2:")[0], describe(status)
        planned = cli("plan", spec.name)
        assert "schema of node n2:\n    ? index by_hand: not in the schema files (kept)" in planned.stdout, describe(planned)

        # An incompatible change is refused, and nothing changes on any node.
        (workdir / "schema.sql").write_text(ROLLOUT.replace("total REAL DEFAULT 0", "total INTEGER DEFAULT 0")
                                            + "CREATE TABLE later (id TEXT PRIMARY KEY);\n")
        chown_tree(workdir)
        refused = cli("apply", spec.name)
        assert refused.returncode == 1, describe(refused)
        assert "! column orders.total: type change REAL -> INTEGER not supported (needs a manual migration)" in refused.stderr, describe(refused)
        assert "Traceback" not in refused.stderr
        for name in names:
            assert "later" not in [row[0] for row in sqlite3.connect(dbs[name]).execute("SELECT name FROM sqlite_schema")]
        skipped = cli("apply", "--skip-incompatible-schema", spec.name)
        assert skipped.returncode == 0, describe(skipped)
        assert "left as it is: ! column orders.total" in skipped.stdout, describe(skipped)
        for name in names:
            assert "later" in [row[0] for row in sqlite3.connect(dbs[name]).execute("SELECT name FROM sqlite_schema")]
    finally:
        result = cli("destroy", "--purge", spec.name)
        shutil.rmtree(workdir, ignore_errors=True)
        assert result.returncode == 0, describe(result)
