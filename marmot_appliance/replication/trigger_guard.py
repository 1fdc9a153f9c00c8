"""Keep the application's own triggers from writing replicated tables a second time on apply.

When the applier writes a row, SQLite fires the application's triggers on that table, exactly as
it did on the origin. What those triggers wrote on the origin is already on its way: a write to
a replicated table made by a trigger is captured like any other write and arrives as its own
change. Run again on the replica, an `AFTER INSERT` audit trigger would add a second audit row
that no node ever sees, an `updated_at` touch would overwrite the origin's value with a local one.

Triggers that keep state which is *not* replicated must keep firing, though: an FTS5
external-content index maintained by `AFTER INSERT/UPDATE/DELETE` triggers (virtual tables are
never captured), or a table this node excludes. So triggers are not switched off as a whole
(`SQLITE_DBCONFIG_ENABLE_TRIGGER` would leave replicas unsearchable); instead SQLite's
authorizer, installed on the applier's connection only, looks at each statement inside a
trigger program when it is compiled. The authorizer names the innermost trigger behind every
access, so a write that an application trigger makes to a table this node replicates is
answered with SQLITE_IGNORE:

* an INSERT (including INSERT ... ON CONFLICT and REPLACE) is not compiled at all;
* an UPDATE leaves every column it would set unchanged;
* a DELETE cannot be ignored (SQLite runs it anyway; SQLITE_IGNORE only disables its truncate
  optimization), so it runs on the replica too. The origin's own deletes arrive as well, so
  the copies agree unless a replica holds a row the origin's trigger never saw; each such
  trigger is reported once in the log (docs/capture.md, "Application triggers").

Writes to anything else (virtual tables and their shadow tables, excluded tables, tables without
a primary key, temp tables) and everything outside trigger programs pass. Decisions are taken
when a statement is prepared; a schema change re-prepares statements, and the applier updates
the set of replicated tables before its statements run (BatchApplier._refresh_schema).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable

from marmot_appliance.replication.types import BOOKKEEPING_PREFIX

log = logging.getLogger(__name__)

_WRITES = frozenset({sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE})


class AppTriggerGuard:
    """The authorizer of the applier's connection. Install once, right after connecting."""

    def __init__(self) -> None:
        self._replicated: frozenset[str] = frozenset()  # lower-case names of tables applied here
        self._reported_deletes: set[tuple[str, str]] = set()

    def install(self, conn: sqlite3.Connection) -> None:
        conn.set_authorizer(self._authorize)

    def set_replicated(self, tables: Iterable[str]) -> None:
        self._replicated = frozenset(name.lower() for name in tables)

    def _authorize(self, action: int, arg1: str | None, _arg2: str | None, database: str | None,
                   trigger: str | None) -> int:
        if trigger is None or action not in _WRITES or database != "main" or arg1 is None:
            return sqlite3.SQLITE_OK
        if trigger.startswith(BOOKKEEPING_PREFIX) or arg1.lower() not in self._replicated:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_DELETE:
            if (trigger, arg1) not in self._reported_deletes:
                self._reported_deletes.add((trigger, arg1))
                log.warning(
                    "trigger %r deletes rows of the replicated table %r: SQLite cannot skip a DELETE, so it "
                    "also runs when this node applies other nodes' changes (see docs/capture.md, "
                    "'Application triggers'; a foreign key ON DELETE CASCADE replicates exactly)",
                    trigger, arg1,
                )
            return sqlite3.SQLITE_OK
        return sqlite3.SQLITE_IGNORE
