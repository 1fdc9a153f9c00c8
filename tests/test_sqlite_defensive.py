"""SQLite's defensive mode on the Python the project targets (3.11 has no Connection.setconfig).

A restored snapshot is untrusted input (docs/security.md): with defensive mode a hostile file
cannot be used to rewrite sqlite_schema through `PRAGMA writable_schema`. Before, the restore
applied it only on Python 3.12+, so on Debian 12's 3.11 the downloaded file was opened without it.
Real SQLite files.
"""

from __future__ import annotations

import sqlite3

import pytest

from marmot_appliance.replication.sqlite_defensive import enable_defensive
from marmot_appliance.snapshots import dbrestore


def _rewrite_schema(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = sql || ' ' WHERE name = 't'")
    conn.commit()


def _database(tmp_path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "untrusted.db")
    conn.execute("CREATE TABLE t (a)")
    conn.commit()
    return conn


def test_without_defensive_mode_the_schema_can_be_rewritten(tmp_path):
    conn = _database(tmp_path)
    _rewrite_schema(conn)  # the control: this is what defensive mode must forbid
    conn.close()


def test_defensive_mode_is_on_and_forbids_rewriting_the_schema(tmp_path):
    conn = _database(tmp_path)
    assert enable_defensive(conn) is True
    with pytest.raises(sqlite3.DatabaseError):
        _rewrite_schema(conn)
    conn.close()


def test_the_restore_opens_the_downloaded_copy_defensively(tmp_path):
    conn = _database(tmp_path)
    dbrestore._distrust_schema(conn)
    assert conn.execute("PRAGMA trusted_schema").fetchone()[0] == 0
    with pytest.raises(sqlite3.DatabaseError):
        _rewrite_schema(conn)
    conn.close()


def test_a_closed_connection_is_reported_not_guessed(tmp_path):
    conn = _database(tmp_path)
    conn.close()
    assert enable_defensive(conn) is False
