"""Which tables a snapshot's rows speak for: the saver's table selection, recorded in the manifest.

A node that excludes a table (`tables.exclude`, or leaves it out of `tables.include`) keeps its
own local rows in it. A snapshot it saves carries those rows; a node that replicates the table
must not restore them as the cluster's (its capture would then publish them to everyone). So
the saver records its selection, the fingerprint of every table it replicated, and the tables it
did not; a restorer takes only a snapshot whose saver replicated every table it replicates
(SnapshotInfo.selection_problem).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from marmot_appliance.replication.introspect import table_layout, user_tables
from marmot_appliance.snapshots.local_state import open_readonly
from marmot_appliance.spec.model import TableSelection


@dataclass(frozen=True)
class SnapshotTables:
    selection: dict[str, list[str]]
    replicated: dict[str, str]  # table -> fingerprint (columns and primary key)
    local: tuple[str, ...]  # tables in the file the saver does not replicate


def describe_tables(copy_path: Path, selection: TableSelection) -> SnapshotTables:
    """The tables of a snapshot copy, split by the saving node's selection."""
    conn = open_readonly(copy_path)
    try:
        replicated: dict[str, str] = {}
        local: list[str] = []
        for name in user_tables(conn):
            if not selection.selects(name):
                local.append(name)
                continue
            layout = table_layout(conn, name)
            if layout is not None:
                replicated[name] = layout.fingerprint
    finally:
        conn.close()
    return SnapshotTables(
        selection={"include": list(selection.include), "exclude": list(selection.exclude)},
        replicated=replicated,
        local=tuple(local),
    )
