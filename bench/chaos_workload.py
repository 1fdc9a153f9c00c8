"""The chaos harness's application: one writer process per node, writing its node's database.

    python bench/chaos_workload.py --db n1.db --node-id 1 --seed 7 --log ops-1.jsonl --rate 25

Every operation a writer commits is appended to its log as one JSON line *after* COMMIT
returned (a transaction that failed, e.g. on a lock held by a paused node, is not recorded).
Each record carries the row images the transaction left behind and their versions (the capture
clock each statement advanced), read back inside the same transaction, so the oracle knows which
values some writer wrote and which of them last-writer-wins must keep.

Key spaces (see docs/reliability.md, "The chaos harness"):

* private keys (`items` ids `n<node>-<k>`, `ledger` ids `l<node>-<k>`): only this node writes
  them, so the converged value must be this writer's last one;
* contested keys (`items` ids `c<k>`, every `accounts` row, every `tags` row): every node
  writes them at once, so the converged value must be one some writer wrote.

Operations: inserts, updates, deletes, primary-key changes (private and contested), upserts,
and a multi-row transaction over three tables (a transfer between two accounts plus a ledger
row plus a tag). The writer stops at SIGTERM after its current transaction.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script by the harness: the repository is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marmot_appliance.replication.bookkeeping import CLOCK_TABLE  # noqa: E402
from marmot_appliance.replication.sqlite_util import quote_ident  # noqa: E402

SCHEMA = """
CREATE TABLE items (id TEXT PRIMARY KEY, val TEXT NOT NULL, n INTEGER NOT NULL, token TEXT NOT NULL);
CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, balance INTEGER NOT NULL, token TEXT NOT NULL);
CREATE TABLE ledger (id TEXT PRIMARY KEY, account INTEGER NOT NULL, amount INTEGER NOT NULL, token TEXT NOT NULL);
CREATE TABLE tags (kind TEXT NOT NULL, slot INTEGER NOT NULL, note TEXT NOT NULL,
                   PRIMARY KEY (kind, slot)) WITHOUT ROWID;
"""
ACCOUNTS = 8
CONTESTED_ITEMS = 16
TAG_KINDS = ("red", "green", "blue")
TAG_SLOTS = 4
# The tables the oracle checks, with their primary-key columns in order.
PRIMARY_KEYS = {"items": ("id",), "accounts": ("id",), "ledger": ("id",), "tags": ("kind", "slot")}


def initial_rows() -> dict[str, list[tuple]]:
    """The shared starting state, written into every node's file before capture exists."""
    return {"accounts": [(i, f"owner-{i}", 1000, "initial") for i in range(ACCOUNTS)]}


def create_database(path: Path) -> Path:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        with conn:
            for table, rows in initial_rows().items():
                marks = ", ".join("?" * len(rows[0]))
                conn.executemany(f"INSERT INTO {quote_ident(table)} VALUES ({marks})", rows)
    finally:
        conn.close()
    return path


class Writer:
    """Commits random operations and records each committed one."""

    def __init__(self, db: Path, node_id: int, rng: random.Random, log) -> None:
        self.conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA busy_timeout = 30000")
        self.node_id = node_id
        self.rng = rng
        self.log = log
        self.txn = 0
        self.next_private = 0
        self.private_items: list[str] = []  # keys this writer inserted and did not delete or move away
        self.committed = 0
        self.failed = 0

    # -- helpers ---------------------------------------------------------------------------------

    def _token(self, index: int = 0) -> str:
        return f"{self.node_id}:{self.txn}:{index}"

    def _row(self, table: str, key: tuple) -> list | None:
        where = " AND ".join(f"{quote_ident(column)} = ?" for column in PRIMARY_KEYS[table])
        row = self.conn.execute(f"SELECT * FROM {quote_ident(table)} WHERE {where}", key).fetchone()
        return list(row) if row is not None else None

    def _version(self) -> int:
        """The version the capture trigger gave the row change just made: the clock it advanced.
        Every statement here changes at most one row, inside this writer's own write transaction."""
        return self.conn.execute(f"SELECT hlc FROM {quote_ident(CLOCK_TABLE)}").fetchone()[0]

    def _upserted(self, table: str, key: tuple) -> dict:
        return {"op": "upsert", "table": table, "key": list(key), "row": self._row(table, key),
                "version": self._version()}

    def _deleted(self, table: str, key: tuple) -> dict:
        return {"op": "delete", "table": table, "key": list(key), "version": self._version()}

    def _moved(self, table: str, old: tuple, new: tuple) -> list[dict]:
        """A primary-key change is captured as delete(old key) then upsert(new key), each with its
        own version: the delete's is one below the clock the statement left behind."""
        upsert = self._upserted(table, new)
        return [{"op": "delete", "table": table, "key": list(old), "version": upsert["version"] - 1,
                 "moved_to": list(new)}, upsert]

    def _fresh_private(self) -> str:
        self.next_private += 1
        return f"n{self.node_id}-{self.next_private}"

    # -- operations: each returns the records of what it changed (empty: it changed nothing) ------

    def insert_private(self) -> list[dict]:
        key = self._fresh_private()
        self.conn.execute("INSERT INTO items VALUES (?, ?, ?, ?)", (key, "new", self.rng.randrange(1000), self._token()))
        self.private_items.append(key)
        return [self._upserted("items", (key,))]

    def update_private(self) -> list[dict]:
        if not self.private_items:
            return self.insert_private()
        key = self.rng.choice(self.private_items)
        cursor = self.conn.execute("UPDATE items SET val = ?, n = n + 1, token = ? WHERE id = ?",
                                   ("updated", self._token(), key))
        return [self._upserted("items", (key,))] if cursor.rowcount else []

    def delete_private(self) -> list[dict]:
        if not self.private_items:
            return []
        key = self.private_items.pop(self.rng.randrange(len(self.private_items)))
        cursor = self.conn.execute("DELETE FROM items WHERE id = ?", (key,))
        return [self._deleted("items", (key,))] if cursor.rowcount else []

    def move_private(self) -> list[dict]:
        """A primary-key change: the row keeps its other values under a new key."""
        if not self.private_items:
            return []
        index = self.rng.randrange(len(self.private_items))
        old, new = self.private_items[index], self._fresh_private()
        cursor = self.conn.execute("UPDATE items SET id = ?, token = ? WHERE id = ?", (new, self._token(), old))
        if not cursor.rowcount:
            return []
        self.private_items[index] = new
        return self._moved("items", (old,), (new,))

    def upsert_contested(self) -> list[dict]:
        key = f"c{self.rng.randrange(CONTESTED_ITEMS)}"
        self.conn.execute(
            "INSERT INTO items VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET val = excluded.val, "
            "n = items.n + 1, token = excluded.token", (key, f"from {self.node_id}", 0, self._token()))
        return [self._upserted("items", (key,))]

    def delete_contested(self) -> list[dict]:
        key = f"c{self.rng.randrange(CONTESTED_ITEMS)}"
        cursor = self.conn.execute("DELETE FROM items WHERE id = ?", (key,))
        return [self._deleted("items", (key,))] if cursor.rowcount else []

    def move_contested(self) -> list[dict]:
        """A contested primary-key change: several nodes may move the same row at once."""
        old, new = (f"c{k}" for k in self.rng.sample(range(CONTESTED_ITEMS), 2))
        if self.conn.execute("SELECT 1 FROM items WHERE id = ?", (new,)).fetchone():
            return []
        cursor = self.conn.execute("UPDATE items SET id = ?, token = ? WHERE id = ?", (new, self._token(), old))
        if not cursor.rowcount:
            return []
        return self._moved("items", (old,), (new,))

    def transfer(self) -> list[dict]:
        """One transaction over three tables: two contested accounts, a private ledger row, a tag."""
        source, target = self.rng.sample(range(ACCOUNTS), 2)
        amount = self.rng.randrange(1, 50)
        records = []
        for account, delta, index in ((source, -amount, 0), (target, amount, 1)):
            cursor = self.conn.execute("UPDATE accounts SET balance = balance + ?, token = ? WHERE id = ?",
                                       (delta, self._token(index), account))
            if cursor.rowcount:
                records.append(self._upserted("accounts", (account,)))
        self.next_private += 1
        ledger_key = f"l{self.node_id}-{self.next_private}"
        self.conn.execute("INSERT INTO ledger VALUES (?, ?, ?, ?)", (ledger_key, source, amount, self._token(2)))
        records.append(self._upserted("ledger", (ledger_key,)))
        tag = (self.rng.choice(TAG_KINDS), self.rng.randrange(TAG_SLOTS))
        self.conn.execute("INSERT INTO tags VALUES (?, ?, ?) ON CONFLICT (kind, slot) DO UPDATE SET note = excluded.note",
                          (*tag, self._token(3)))
        records.append(self._upserted("tags", tag))
        return records

    def delete_tag(self) -> list[dict]:
        tag = (self.rng.choice(TAG_KINDS), self.rng.randrange(TAG_SLOTS))
        cursor = self.conn.execute("DELETE FROM tags WHERE kind = ? AND slot = ?", tag)
        return [self._deleted("tags", tag)] if cursor.rowcount else []

    OPERATIONS = (
        (insert_private, 4), (update_private, 3), (delete_private, 1), (move_private, 1),
        (upsert_contested, 3), (delete_contested, 1), (move_contested, 1), (transfer, 3), (delete_tag, 1),
    )

    def step(self) -> None:
        """One transaction of one to three operations; recorded only once committed."""
        self.txn += 1
        functions, weights = zip(*self.OPERATIONS)
        records: list[dict] = []
        private_before = (list(self.private_items), self.next_private)
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for operation in self.rng.choices(functions, weights, k=self.rng.choice((1, 1, 2, 3))):
                records += operation(self)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self.failed += 1
            self.private_items, _ = private_before  # keys are never reused: keep next_private
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            print(f"writer {self.node_id}: transaction {self.txn} not committed: {exc}", file=sys.stderr)
            return
        self.committed += 1
        if records:
            self.log.write(json.dumps({"writer": self.node_id, "txn": self.txn, "ops": records}) + "\n")
            self.log.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="chaos harness writer (started by bench/chaos.py)")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--node-id", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=25.0, help="transactions per second (upper bound)")
    args = parser.parse_args(argv)

    stopping = False

    def stop(_signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    pause_request, paused = args.log.with_suffix(".pause"), args.log.with_suffix(".paused")
    with open(args.log, "a", encoding="utf-8") as log:
        writer = Writer(args.db, args.node_id, random.Random(args.seed), log)
        pause = 1.0 / args.rate
        while not stopping:
            if pause_request.exists():
                paused.touch()
                time.sleep(0.05)
                continue
            paused.unlink(missing_ok=True)
            writer.step()
            time.sleep(writer.rng.uniform(0, 2 * pause))
    print(f"writer {args.node_id}: {writer.committed} committed, {writer.failed} not committed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
