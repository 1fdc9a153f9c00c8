"""The application's own triggers during apply (issue 10 case 5), on real node processes.

A replica must end with what the origin has: the origin's trigger effects on replicated tables
arrive as captured changes, so the replica's copy of those triggers must not write them a second
time (an audit row, an `updated_at` touch). Triggers that keep state which is *not* replicated
(an FTS5 external-content index, a table this node excludes) must keep firing on every node, or
replicas end up unsearchable.
"""

from __future__ import annotations

import sqlite3

from tests.replication_cluster import SubprocessNode, execute, table_rows, wait_until

SCHEMA = """
CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, updated_at TEXT);
CREATE TABLE audit (id TEXT PRIMARY KEY DEFAULT (lower(hex(randomblob(8)))), note TEXT, what TEXT);
CREATE VIRTUAL TABLE notes_fts USING fts5(body, content=notes, content_rowid=rowid);
-- Derived, not replicated: the full-text index (virtual tables are never captured).
CREATE TRIGGER notes_fts_ai AFTER INSERT ON notes BEGIN
  INSERT INTO notes_fts(rowid, body) VALUES (new.rowid, new.body);
END;
CREATE TRIGGER notes_fts_au AFTER UPDATE ON notes BEGIN
  INSERT INTO notes_fts(notes_fts, rowid, body) VALUES ('delete', old.rowid, old.body);
  INSERT INTO notes_fts(rowid, body) VALUES (new.rowid, new.body);
END;
CREATE TRIGGER notes_fts_ad AFTER DELETE ON notes BEGIN
  INSERT INTO notes_fts(notes_fts, rowid, body) VALUES ('delete', old.rowid, old.body);
END;
-- Effects on replicated tables: the origin's arrive as captured changes.
CREATE TRIGGER notes_audit AFTER INSERT ON notes BEGIN
  INSERT INTO audit(note, what) VALUES (new.id, 'created');
END;
CREATE TRIGGER notes_touch AFTER UPDATE OF body ON notes BEGIN
  UPDATE notes SET updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') || ' ' || hex(randomblob(4))
  WHERE id = new.id;
END;
"""


REPLICATED = ("notes", "audit")


async def _converged(dbs) -> None:
    """Equal replicated tables (the FTS shadow tables are per node: rowids differ, so do their pages)."""

    def same() -> bool:
        return all(table_rows(dbs[0], t) == table_rows(db, t) for db in dbs[1:] for t in REPLICATED)

    await wait_until(same, what="notes and audit to converge")


def _search(db, word: str) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return sorted(
            row[0]
            for row in conn.execute(
                "SELECT notes.id FROM notes_fts JOIN notes ON notes.rowid = notes_fts.rowid WHERE notes_fts MATCH ?",
                (word,),
            )
        )
    finally:
        conn.close()


def _integrity_ok(db) -> bool:
    conn = sqlite3.connect(db)
    try:
        conn.execute("INSERT INTO notes_fts(notes_fts) VALUES ('integrity-check')")
        conn.commit()
        return True
    finally:
        conn.close()


async def test_app_triggers_write_replicated_tables_once_and_keep_fts_indexes_on_every_node(nats_server, wal_db, tmp_path):
    dbs = [wal_db(f"n{i}.db", SCHEMA) for i in (1, 2)]
    nodes = [SubprocessNode(i, db, nats_server.url, tmp_path / f"n{i}.log", shards=2, replicas=1).start()
             for i, db in zip((1, 2), dbs)]
    try:
        for node in nodes:
            await node.wait_healthy()
        execute(dbs[0], "INSERT INTO notes (id, body) VALUES (?, ?)",
                [("a", "replicated apples"), ("b", "local bananas")], many=True)
        execute(dbs[1], "INSERT INTO notes (id, body) VALUES ('c', 'cherries from node two')")
        await wait_until(lambda: all(len(table_rows(db, "notes")) == 3 and len(table_rows(db, "audit")) >= 3
                                     for db in dbs), what="every note and its audit row everywhere")
        # One audit row per note on every node: the replica's copy of the trigger did not add its own.
        for db in dbs:
            assert sorted((note, what) for _id, note, what in table_rows(db, "audit")) == [
                ("a", "created"), ("b", "created"), ("c", "created")]
        await _converged(dbs)
        # Rows written on the other node are searchable here: the FTS triggers fired on apply.
        assert _search(dbs[1], "apples") == ["a"]
        assert _search(dbs[0], "cherries") == ["c"]

        execute(dbs[0], "UPDATE notes SET body = 'replicated pears' WHERE id = 'a'")
        execute(dbs[0], "DELETE FROM notes WHERE id = 'b'")
        await _converged(dbs)
        # The touch ran on the origin only; its value arrived as part of the captured row.
        assert table_rows(dbs[0], "notes") == table_rows(dbs[1], "notes")
        assert _search(dbs[1], "pears") == ["a"]
        assert _search(dbs[1], "apples") == []
        assert _search(dbs[1], "bananas") == []
        assert all(_integrity_ok(db) for db in dbs)
    finally:
        for node in nodes:
            node.terminate()
