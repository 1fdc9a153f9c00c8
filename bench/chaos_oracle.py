"""The chaos harness's oracle: what must hold once faults are healed and the cluster is quiet.

Inputs are the writers' logs of committed operations (bench/chaos_workload.py) and the nodes'
database files. The checks, each independent of the replication code under test:

1. **Same files**: every replicated table has the same order-independent digest on every node
   (marmot_appliance.replication.digest, the canonical row encoding).
2. **Nothing acknowledged is lost**: every key some writer committed a row for is present,
   unless some writer deleted it (or moved it away with a primary-key change).
3. **No invented values**: every row present is a row image some writer committed (or the shared
   starting state).
4. **Private keys are exact**: a key only one writer ever touched holds that writer's last image,
   or is absent if its last operation removed it.
4b. **Last writer wins, exactly**: every key holds the image of the write with the largest
   (version, origin) any writer committed for it (absent if that write was a delete). Writers
   record each change's version (the capture clock their statement advanced).
5. **No stray bookkeeping**: no dead letters other than injected poison, no held or parked rows.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from marmot_appliance.replication.bookkeeping import HELD_TABLE, PARKED_TABLE
from marmot_appliance.replication.digest import table_digest
from marmot_appliance.replication.sqlite_util import quote_ident
from marmot_appliance.replication.types import DEAD_LETTER_TABLE

SAMPLES = 5  # problems listed per check; the count is always complete


@dataclass
class KeyHistory:
    images: set = field(default_factory=set)  # every row image committed for the key
    newest: tuple | None = None  # ((version, origin), row image or None for a delete): what LWW must keep
    removed: bool = False  # some writer deleted it or moved it away
    writers: set = field(default_factory=set)
    last: dict = field(default_factory=dict)  # writer -> its last record for the key


@dataclass
class History:
    keys: dict = field(default_factory=lambda: defaultdict(KeyHistory))  # (table, key tuple) -> KeyHistory
    transactions: int = 0
    operations: int = 0


def load_history(logs: list[Path], initial: dict[str, list[tuple]], primary_keys: dict[str, tuple]) -> History:
    history = History()
    for table, rows in initial.items():
        width = len(primary_keys[table])
        for row in rows:
            entry = history.keys[(table, _key(row, table, primary_keys, width))]
            entry.images.add(tuple(row))
            entry.newest = ((0, 0), tuple(row))  # rows that predate capture have version (0, 0)
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            history.transactions += 1
            for op in record["ops"]:
                history.operations += 1
                entry = history.keys[(op["table"], tuple(op["key"]))]
                entry.writers.add(record["writer"])
                entry.last[record["writer"]] = op
                if op["op"] == "delete":
                    entry.removed = True
                else:
                    entry.images.add(tuple(op["row"]))
                if "version" in op:
                    stamp = (op["version"], record["writer"])
                    if entry.newest is None or stamp > entry.newest[0]:
                        entry.newest = (stamp, None if op["op"] == "delete" else tuple(op["row"]))
    return history


def _key(row, table: str, primary_keys: dict[str, tuple], width: int) -> tuple:
    # The initial tables put their key columns first (see chaos_workload.SCHEMA).
    return tuple(row[:width])


def read_rows(db: Path, table: str, key_columns: tuple) -> dict[tuple, tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        cursor = conn.execute(f"SELECT * FROM {quote_ident(table)}")
        names = [d[0] for d in cursor.description]
        positions = [names.index(column) for column in key_columns]
        return {tuple(row[p] for p in positions): tuple(row) for row in cursor}
    finally:
        conn.close()


def bookkeeping_counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        counts = {}
        for table in (DEAD_LETTER_TABLE, HELD_TABLE, PARKED_TABLE):
            try:
                counts[table] = conn.execute(f"SELECT count(*) FROM {quote_ident(table)}").fetchone()[0]
            except sqlite3.OperationalError:
                counts[table] = 0
        return counts
    finally:
        conn.close()


def dead_letter_payloads(db: Path) -> list[bytes]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return [bytes(r[0] or b"") for r in conn.execute(f"SELECT payload FROM {quote_ident(DEAD_LETTER_TABLE)}")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def digests(dbs: dict[int, Path], tables: list[str]) -> dict[int, dict[str, str]]:
    return {node: table_digest(db, tables) for node, db in dbs.items()}


def differing_tables(node_digests: dict[int, dict[str, str]]) -> list[str]:
    tables = next(iter(node_digests.values())).keys()
    return [t for t in tables if len({d[t] for d in node_digests.values()}) > 1]


def check_files_equal(dbs: dict[int, Path], primary_keys: dict[str, tuple]) -> list[str]:
    """Check 1, with the differing keys and each node's row when they differ."""
    node_digests = digests(dbs, list(primary_keys))
    problems = []
    for table in differing_tables(node_digests):
        per_node = {node: read_rows(db, table, primary_keys[table]) for node, db in dbs.items()}
        all_keys = sorted(set().union(*per_node.values()), key=repr)
        differing = [k for k in all_keys if len({repr(rows.get(k)) for rows in per_node.values()}) > 1]
        samples = "; ".join(
            f"{k!r}: " + ", ".join(f"node {n}={rows.get(k)!r}" for n, rows in per_node.items())
            for k in differing[:SAMPLES])
        problems.append(f"files differ: table {table}: {len(differing)} keys differ, e.g. {samples}")
    return problems


def check_history(db: Path, history: History, primary_keys: dict[str, tuple]) -> list[str]:
    """Checks 2-4 on one (converged) database."""
    missing, invented, private_wrong, not_newest = [], [], [], []
    final = {table: read_rows(db, table, columns) for table, columns in primary_keys.items()}
    for (table, key), entry in history.keys.items():
        row = final[table].get(key)
        if row is None and entry.images and not entry.removed:
            missing.append(f"{table} {key!r}")
        if row is not None and row not in entry.images:
            invented.append(f"{table} {key!r} = {row!r}")
        if entry.newest is not None and row != entry.newest[1]:
            (version, origin), expected = entry.newest
            not_newest.append(f"{table} {key!r}: newest write ({version}, node {origin}) left {expected!r}, "
                              f"found {row!r}")
        if len(entry.writers) == 1 and table != "accounts":
            (writer,) = entry.writers
            last = entry.last[writer]
            expected = None if last["op"] == "delete" else tuple(last["row"])
            if row != expected:
                private_wrong.append(f"{table} {key!r}: writer {writer} last left {expected!r}, found {row!r}")
    for table, rows in final.items():
        for key, row in rows.items():
            if (table, key) not in history.keys:
                invented.append(f"{table} {key!r} = {row!r} (no writer ever wrote this key)")
    problems = []
    for label, items in (("acknowledged writes missing (never deleted)", missing),
                         ("rows no writer wrote", invented),
                         ("single-writer keys not at their writer's last value", private_wrong),
                         ("keys not at their newest write (last-writer-wins by (version, origin))", not_newest)):
        if items:
            problems.append(f"{label}: {len(items)}, e.g. " + "; ".join(items[:SAMPLES]))
    return problems


def check_bookkeeping(dbs: dict[int, Path], poison: list[bytes]) -> list[str]:
    problems = []
    for node, db in dbs.items():
        counts = bookkeeping_counts(db)
        stray = [p for p in dead_letter_payloads(db) if p not in poison]
        if stray:
            problems.append(f"node {node}: {len(stray)} dead letters that are not injected poison, "
                            f"e.g. {stray[0][:80]!r}")
        for table in (HELD_TABLE, PARKED_TABLE):
            if counts[table]:
                problems.append(f"node {node}: {counts[table]} rows left in {table}")
    return problems
