"""The set-based apply of row groups (RowWriter.apply_groups over temporary tables) leaves exactly
what the per-statement executemany form left, on randomized batches applied to real SQLite files.

Both forms run the same decoded batches (encode_batch -> decode_for_apply, as a receiver gets
them) on two copies of one receiver database with capture triggers installed; afterwards every
user table (rowids and storage classes included), versions table, position, dead letter, parked
row and capture log must be equal, and so must each batch's ApplyOutcome.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marmot_appliance.replication import bookkeeping as bk
from marmot_appliance.replication.applier import BatchApplier
from marmot_appliance.replication.apply_plan import set_table
from marmot_appliance.replication.capture import ChangeCapture
from marmot_appliance.replication.codec import GroupedBatch, decode_for_apply, encode_batch
from marmot_appliance.replication.types import DEAD_LETTER_TABLE, ChangeBatch, RowChange

RECEIVER = 2
BASE = 1 << 50  # far below any real clock value: never held as clock skew
SCHEMA = """
CREATE TABLE t_text (id TEXT PRIMARY KEY, a, b REAL, c TEXT, d BLOB, e INTEGER DEFAULT 7);
CREATE TABLE t_nocase (id TEXT COLLATE NOCASE PRIMARY KEY, a INTEGER, b);
CREATE TABLE t_int (id INTEGER PRIMARY KEY, a NUMERIC, b TEXT);
CREATE TABLE t_comp (k1 INTEGER, k2 TEXT COLLATE NOCASE, v, PRIMARY KEY (k1, k2)) WITHOUT ROWID;
CREATE TABLE t_untyped (id PRIMARY KEY, v);
CREATE TABLE t_uniq (id INTEGER PRIMARY KEY, email TEXT UNIQUE, n INTEGER CHECK (n IS NULL OR n >= 0));
CREATE TABLE "we""ird" ("k""ey" TEXT PRIMARY KEY, "va lue");
"""
# table -> (key columns, other columns); the rows' shapes are drawn from these.
TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "t_text": (("id",), ("a", "b", "c", "d", "e")),
    "t_nocase": (("id",), ("a", "b")),
    "t_int": (("id",), ("a", "b")),
    "t_comp": (("k1", "k2"), ("v",)),
    "t_untyped": (("id",), ("v",)),
    "t_uniq": (("id",), ("email", "n")),
    'we"ird': (('k"ey',), ("va lue",)),
    "t_missing": (("id",), ("v",)),  # not on the receiver: parked
}

values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 5, -1, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 5.0, 0.1, 1e300]),
    st.text(max_size=4),
    st.sampled_from(["5", "5.0", "007", "a", "A", " a", "a\x00b", ""]),
    st.binary(max_size=4),
)
# Keys from small pools: duplicates within a group and across batches, NOCASE twins, and the
# same key in several storage classes ('5', 5, 5.0, b'5').
keys = st.sampled_from([1, 2, 5, "5", "5.0", 5.0, "a", "A", "b", "B", b"5", b"a", None, -(2**63)])
emails = st.sampled_from([None, "x", "X", "y", 5])
versions = st.integers(min_value=0, max_value=12)
origins = st.sampled_from([1, 3, 4])


@st.composite
def row(draw: Any, tables: list[str]) -> RowChange:
    table = draw(st.sampled_from(tables))
    key_columns, others = TABLES[table]
    key = tuple(draw(keys) for _ in key_columns)
    version, origin = BASE + draw(versions), draw(origins)
    if draw(st.integers(0, 3)) == 0:
        return RowChange(table, "delete", key, key_columns, key, version, origin)
    # All columns, or (a rolling ADD COLUMN) only some: another shape, its own group.
    carried = others if draw(st.booleans()) else others[: draw(st.integers(0, len(others)))]
    if table == "t_uniq":
        vals = tuple(draw(emails) if col == "email" else draw(st.sampled_from([None, 1, -1, 3])) for col in carried)
    else:
        vals = tuple(draw(values) for _ in carried)
    return RowChange(table, "upsert", key, key_columns + carried, key + vals, version, origin)


@st.composite
def batches(draw: Any) -> list[list[ChangeBatch]]:
    """Transactions of batches (each batch: rows of one origin's message)."""
    out = []
    # A few tables per example: the rows meet each other's keys more often.
    tables = draw(st.lists(st.sampled_from(sorted(TABLES)), min_size=1, max_size=3, unique=True))
    for _ in range(draw(st.integers(1, 3))):
        tx = []
        for _ in range(draw(st.integers(1, 3))):
            rows = draw(st.lists(row(tables), min_size=1, max_size=25))
            primary_keys = {table: TABLES[table][0] for table in {r.table for r in rows}}
            tx.append(ChangeBatch(origin=draw(origins), rows=tuple(rows), primary_keys=primary_keys))
        out.append(tx)
    return out


def receiver_db(path: Path, horizon: int) -> Path:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    conn.close()
    capture = ChangeCapture(str(path), RECEIVER)
    capture.install()
    capture.close()
    with BatchApplier(path, RECEIVER):
        pass  # bookkeeping
    conn = sqlite3.connect(path, isolation_level=None)
    with conn:
        bk.set_meta(conn, bk.META_TOMBSTONE_HORIZON, horizon)
    conn.close()
    return path


def state(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Everything an apply leaves behind, values with their storage classes (not timestamps)."""
    conn = sqlite3.connect(path)
    try:
        out: dict[str, list[tuple[Any, ...]]] = {}
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
        for name in names:
            q = '"' + name.replace('"', '""') + '"'
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({q})")]
            if name == DEAD_LETTER_TABLE:
                cols = ["stream", "seq", "reason", "payload"]
            elif name == bk.PARKED_TABLE:
                cols = ["tbl", "reason", "change", "stream", "seq"]
            elif name in (bk.CLOCK_TABLE, bk.META_TABLE):
                continue  # the clock follows the wall clock
            typed = ", ".join(f'"{c.replace(chr(34), chr(34) * 2)}", typeof("{c.replace(chr(34), chr(34) * 2)}")'
                              for c in cols)
            listed = conn.execute("SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?", (name,))
            rowid = "" if listed.fetchone()[0] else "rowid, "
            rows = conn.execute(f"SELECT {rowid}{typed} FROM {q}").fetchall()
            # repr: tells -0.0 from 0.0 and 5 from 5.0 exactly; rowids included where there are
            out[name] = sorted(tuple(repr(v) for v in r) for r in rows)
        return out
    finally:
        conn.close()


def apply_all(path: Path, transactions: list[list[ChangeBatch]], set_based: bool) -> list[tuple[Any, ...]]:
    outcomes = []
    seq = 0
    with BatchApplier(path, RECEIVER) as app:
        app._rows.set_based = set_based
        for tx in transactions:
            items = []
            for batch in tx:
                seq += 1
                decoded = decode_for_apply(encode_batch(batch))
                items.append((decoded, "s", seq))
            for o in app.apply_many(items):
                outcomes.append((o.seq, o.rows_applied, o.rows_stale, o.rows_parked, o.rows_held,
                                 o.rows_ignored, o.rows_rejected, o.max_version))
    return outcomes


def compare(transactions: list[list[ChangeBatch]], horizon: int) -> None:
    with tempfile.TemporaryDirectory(prefix="setapply-") as tmp:
        old = receiver_db(Path(tmp) / "old.db", horizon)
        new = receiver_db(Path(tmp) / "new.db", horizon)
        old_outcomes = apply_all(old, transactions, set_based=False)
        new_outcomes = apply_all(new, transactions, set_based=True)
        old_state, new_state = state(old), state(new)
        assert set(old_state) == set(new_state)
        for table in old_state:
            assert new_state[table] == old_state[table], table
        assert new_outcomes == old_outcomes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(transactions=batches(), horizon=st.sampled_from([0, BASE + 2]))
def test_set_based_apply_equals_executemany(transactions: list[list[ChangeBatch]], horizon: int) -> None:
    compare(transactions, horizon)


def test_the_batches_take_the_grouped_path() -> None:
    """What the property test applies is GroupedBatch (the path under test), with several
    groups of one width in a batch (one set table reloaded)."""
    rows = (
        RowChange("t_untyped", "delete", (1,), ("id",), (1,), BASE + 1, 1),
        RowChange("t_int", "delete", (1,), ("id",), (1,), BASE + 1, 1),
        RowChange("t_untyped", "upsert", ("a",), ("id", "v"), ("a", 1), BASE + 1, 1),
        RowChange("t_nocase", "upsert", ("a",), ("id", "a"), ("a", 1), BASE + 1, 1),
    )
    batch = ChangeBatch(1, rows, primary_keys={"t_untyped": ("id",), "t_int": ("id",), "t_nocase": ("id",)})
    decoded = decode_for_apply(encode_batch(batch))
    assert isinstance(decoded, GroupedBatch)
    widths = [len(g.columns) + 2 for g in decoded.groups]
    assert len(widths) > len(set(widths))
    compare([[batch]], 0)


@pytest.mark.parametrize("horizon", [0, BASE + 5])
def test_known_cases(horizon: int) -> None:
    """Hand-picked: duplicate keys in a group (newer first, older first, a tie broken by origin),
    NOCASE twins, a key in two storage classes, a delete and an upsert of one key in one batch,
    rows at the horizon, a UNIQUE collision and a CHECK failure (the one-by-one path)."""
    r = RowChange
    rows = (
        r("t_text", "upsert", ("k",), ("id", "a"), ("k", 1), BASE + 6, 1),
        r("t_text", "upsert", ("k",), ("id", "a"), ("k", 2), BASE + 7, 1),
        r("t_text", "upsert", ("k",), ("id", "a"), ("k", 3), BASE + 7, 3),
        r("t_text", "upsert", ("k",), ("id", "a"), ("k", 4), BASE + 7, 1),
        r("t_text", "upsert", ("m",), ("id", "a"), ("m", 1.5), BASE + 9, 1),
        r("t_text", "upsert", ("m",), ("id", "a"), ("m", b"x"), BASE + 8, 4),
        r("t_text", "upsert", (5,), ("id", "a"), (5, "five"), BASE + 9, 1),
        r("t_text", "upsert", ("5",), ("id", "a"), ("5", "text five"), BASE + 10, 1),
        r("t_text", "delete", ("m",), ("id",), ("m",), BASE + 10, 1),
        r("t_nocase", "upsert", ("Alice",), ("id", "a"), ("Alice", 1), BASE + 6, 1),
        r("t_nocase", "upsert", ("alice",), ("id", "a"), ("alice", 2), BASE + 8, 1),
        r("t_nocase", "delete", ("ALICE",), ("id",), ("ALICE",), BASE + 7, 1),
        r("t_int", "upsert", ("5",), ("id", "a", "b"), ("5", "1.0", 3), BASE + 6, 1),
        r("t_int", "upsert", (3,), ("id", "a", "b"), (3, float("nan"), None), BASE + 3, 1),
        r("t_uniq", "upsert", (1,), ("id", "email", "n"), (1, "x", 1), BASE + 6, 1),
        r("t_uniq", "upsert", (2,), ("id", "email", "n"), (2, "x", 1), BASE + 7, 1),
        r("t_uniq", "upsert", (3,), ("id", "email", "n"), (3, "z", -1), BASE + 7, 1),
    )
    tables = {row.table for row in rows}
    batch = ChangeBatch(1, rows, primary_keys={t: TABLES[t][0] for t in tables})
    later = ChangeBatch(3, rows[:9], primary_keys={"t_text": ("id",)})
    # A key bound as another storage class than the table keeps it in: the TEXT key column's
    # affinity makes the integer 5 the text '5' (in the insert and in the delete's match).
    deletes = ChangeBatch(4, (
        r("t_text", "delete", (5,), ("id",), (5,), BASE + 11, 4),
        r("t_int", "delete", ("5",), ("id",), ("5",), BASE + 11, 4),
        r("t_nocase", "delete", ("ALICE",), ("id",), ("ALICE",), BASE + 11, 4),
    ), primary_keys={"t_text": ("id",), "t_int": ("id",), "t_nocase": ("id",)})
    compare([[batch], [later, batch], [deletes]], horizon)


def test_set_table_is_temporary_and_untyped(tmp_path: Path) -> None:
    """The set tables live in the applier connection's temp schema (never in the file)."""
    db = receiver_db(tmp_path / "r.db", 0)
    rows = (RowChange("t_untyped", "upsert", (1,), ("id", "v"), (1, 2), BASE + 1, 1),)
    with BatchApplier(db, RECEIVER) as app:
        app.apply(decode_for_apply(encode_batch(ChangeBatch(1, rows, primary_keys={"t_untyped": ("id",)}))), "s", 1)
        conn = app._conn
        assert set_table(4).startswith("temp.")
        declared = {r[2] for r in conn.execute(f"PRAGMA temp.table_info({set_table(4).removeprefix('temp.')})")}
        assert declared == {""}
    conn = sqlite3.connect(db)
    assert not conn.execute("SELECT name FROM sqlite_schema WHERE name LIKE '%set%'").fetchall()
    assert conn.execute("SELECT id, v FROM t_untyped").fetchall() == [(1, 2)]
    conn.close()
