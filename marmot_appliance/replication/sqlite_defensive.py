"""SQLite's defensive mode (SQLITE_DBCONFIG_DEFENSIVE) on any CPython this project supports.

Defensive mode forbids what only a hostile file or statement needs: writing sqlite_schema
(even with `PRAGMA writable_schema`), writing shadow tables, and a few debugging pragmas. The
snapshot restore opens a downloaded file with it (docs/security.md: restored snapshots are
untrusted input). Python 3.12 added `Connection.setconfig`; on 3.11 (Debian 12's Python) the
same switch is reached through the C API: CPython's sqlite3 connection object starts, after its
object header, with its `sqlite3 *` handle (Modules/_sqlite/connection.h, unchanged from 3.7 to
3.11), and `sqlite3_db_config` is called from the library the sqlite3 module itself uses. The
switch is read back, so a layout this code does not know is reported (False), never assumed.
"""

from __future__ import annotations

import ctypes
import sqlite3
import sys
from collections.abc import Callable

SQLITE_DBCONFIG_DEFENSIVE = 1010


def enable_defensive(conn: sqlite3.Connection) -> bool:
    """Turn defensive mode on for `conn`; True when it is on (read back)."""
    # getattr, not conn.setconfig: the type checker targets 3.11, whose sqlite3 has neither.
    setconfig = getattr(conn, "setconfig", None)
    if setconfig is not None:  # Python 3.12+
        try:
            setconfig(SQLITE_DBCONFIG_DEFENSIVE, True)
            return bool(getattr(conn, "getconfig")(SQLITE_DBCONFIG_DEFENSIVE))
        except sqlite3.ProgrammingError:  # a closed connection
            return False
    found = _c_handle(conn)
    if found is None:
        return False
    handle, db_config = found
    state = ctypes.c_int(-1)
    if db_config(handle, SQLITE_DBCONFIG_DEFENSIVE, 1, ctypes.byref(state)) != 0:
        return False
    return state.value == 1


def _c_handle(conn: sqlite3.Connection) -> tuple[ctypes.c_void_p, Callable[..., int]] | None:
    """(the connection's `sqlite3 *`, sqlite3_db_config) on CPython 3.7–3.11, else None."""
    if sys.implementation.name != "cpython" or not (3, 7) <= sys.version_info[:2] < (3, 12):
        return None
    import _sqlite3

    try:
        library = ctypes.CDLL(_sqlite3.__file__)
        db_config = library.sqlite3_db_config
        db_handle_filename = library.sqlite3_db_filename
    except (OSError, AttributeError):
        return None
    db_config.restype = ctypes.c_int
    db_handle_filename.restype = ctypes.c_char_p
    db_handle_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    handle = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
    if not handle:
        return None  # a closed connection
    # The handle must name this connection's own file: a layout we do not know fails here.
    expected = {row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"}
    if (db_handle_filename(handle, b"main") or b"").decode(errors="replace") not in expected:
        return None
    return ctypes.c_void_p(handle), db_config
