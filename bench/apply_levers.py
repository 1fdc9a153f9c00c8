"""Two levers of issue 16 on the receiver's apply path, as CPU per applied row against the applier.

    PYTHONPATH=$PWD .venv/bin/python bench/apply_levers.py [--batches 1000] [--per-tx 30] [--rounds 5]
        [--updates] [--only applier,set-json,...]

Every variant does the same work on the same data: `--batches` change batches of 100 rows of
the bench's `items` table from node 1, encoded and decoded as a receiver gets them
(`decode_for_apply`, outside the timed part), applied `--per-tx` batches per transaction into
a fresh database holding node 2's capture triggers (each applied row evaluates their WHEN) and
the applier's bookkeeping. The rows carry new keys, or with `--updates` keys the receiver
already holds at an older version (applied untimed beforehand): each row then wins as an
update. The figure is CPU time (`time.process_time()`) per applied row, not wall time.
Variants run alternating, one run of each per round (the order rotates each round), after one
untimed warm-up run each; every run is printed, then each variant's median and its ratio to
the baseline (the median of the per-round ratios: both measured in the same round).

  applier          the real `BatchApplier.apply_many`: the baseline.
  set-json         the real applier, but each row group's two `executemany` calls (versions
                   upsert, row statement) become one statement each over `json_each(?)` of the
                   group's rows as one JSON array: the very statements of the group's RowPlan,
                   their per-row parameters read from the JSON rows instead.
  set-temp         the same over a temporary table: one `executemany` loads the group's rows,
                   the two statements read them from there.
  replay-sqlite3   the statements, parameters and transactions the real applier ran (recorded
                   from one extra untimed run), replayed through Python's `sqlite3`: the share of
                   the baseline spent in the SQLite library and its bindings.
  replay-apsw      the same replay through `apsw` and the SQLite it bundles (lever 1).
  replay-set-*     the set-json run's statements replayed through each library.
  plain-*          plain `executemany` inserts of the same rows, same transaction size, into a
                   table without triggers, through each library: the libraries' bare difference.

The apsw variants are skipped, with a message, when apsw is not installed (it is not a
dependency of the appliance; `pip install apsw` to measure them). The set-based variants are
prototypes for this measurement only, not the runtime's code: upsert groups only, and set-json
only for JSON-representable values (no BLOBs, NaN; SQLite 3.40's json_each also cuts a text at
U+0000); anything else falls back to the real `executemany`. What every variant leaves behind
(the table, its versions, the positions, the capture log) is compared with the baseline's and
a difference printed. Runs on this machine only, files in a temporary directory; no network.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from marmot_appliance.replication import applier as applier_module  # noqa: E402
from marmot_appliance.replication import bookkeeping as bk  # noqa: E402
from marmot_appliance.replication.applier import BatchApplier  # noqa: E402
from marmot_appliance.replication.capture import ChangeCapture  # noqa: E402
from marmot_appliance.replication.codec import GroupedBatch, decode_for_apply, encode_batch  # noqa: E402
from marmot_appliance.replication.sqlite_util import connect  # noqa: E402
from marmot_appliance.replication.trigger_guard import AppTriggerGuard  # noqa: E402
from marmot_appliance.replication.types import POSITIONS_TABLE, ChangeBatch, RowChange  # noqa: E402
from marmot_appliance.spec.model import CompressionSettings  # noqa: E402

try:
    import apsw
except ImportError:  # not a dependency: its variants are skipped
    apsw = None

SCHEMA = "CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER, price REAL, label TEXT)"
PLAIN_SCHEMA = "CREATE TABLE plain (id TEXT PRIMARY KEY, n INTEGER, price REAL, label TEXT)"
PLAIN_INSERT = "INSERT INTO plain (id, n, price, label) VALUES (?, ?, ?, ?)"
ORIGIN, RECEIVER = 1, 2
ROWS_PER_BATCH = 100
# What sqlite_util.connect sets on the applier's connection (BatchApplier.__init__): the apsw
# connection gets the same.
APPLIER_PRAGMAS = (
    "PRAGMA busy_timeout = 5000",
    "PRAGMA wal_autocheckpoint = 0",
    "PRAGMA synchronous = NORMAL",
    f"PRAGMA cache_size = {-1024 * 64}",
    "PRAGMA temp_store = MEMORY",
)
APSW_VARIANTS = ("replay-apsw", "replay-set-apsw", "plain-apsw")
VARIANTS = (
    "applier", "set-json", "set-temp", "replay-sqlite3", "replay-apsw",
    "replay-set-sqlite3", "replay-set-apsw", "plain-sqlite3", "plain-apsw",
)

@dataclass
class Workload:
    payloads: list[bytes]  # the batches applied, timed
    prefill: list[bytes]  # batches applied to every receiver database first, untimed


# One recorded call of the applier's connection: ("execute" | "executemany", sql, parameters).
Call = tuple[str, str, Any]


# -- data -----------------------------------------------------------------------------------------

def make_payloads(batches: int, base: int, label: str) -> list[bytes]:
    """The batches as node 1 publishes them: key e<i>, versions from `base` up."""
    payloads = []
    for b in range(batches):
        rows = []
        for k in range(ROWS_PER_BATCH):
            i = b * ROWS_PER_BATCH + k
            key = f"e{i:012d}"
            rows.append(RowChange("items", "upsert", (key,), ("id", "n", "price", "label"),
                                  (key, i, i * 0.25, f"{label} {i}"), base + i, ORIGIN))
        batch = ChangeBatch(origin=ORIGIN, rows=tuple(rows), primary_keys={"items": ("id",)})
        payloads.append(encode_batch(batch, CompressionSettings()))
    return payloads


def decoded(payloads: list[bytes]) -> list[GroupedBatch]:
    out = []
    for payload in payloads:
        batch = decode_for_apply(payload)
        assert isinstance(batch, GroupedBatch), "the bench rows take the applier's grouped path"
        out.append(batch)
    return out


def make_receiver_db(path: Path, prefill: list[bytes]) -> Path:
    """A receiver's database: the table, node 2's capture triggers, the applier's bookkeeping,
    and the `prefill` batches applied (from another stream) when there are any."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    conn.close()
    capture = ChangeCapture(str(path), RECEIVER)
    capture.install()
    capture.close()
    with BatchApplier(path, RECEIVER) as app:
        for i in range(0, len(prefill), 30):
            app.apply_many([(decode_for_apply(p), "prefill", i + j + 1) for j, p in enumerate(prefill[i:i + 30])])
    return path


def make_plain_db(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(PLAIN_SCHEMA)
    conn.close()
    return path


def digest(db: Path) -> str:
    """What an apply leaves behind: the table, its versions, the positions, and the capture log
    (empty: the applier's writes are not captured). Not the clock: it follows the wall clock."""
    conn = sqlite3.connect(db)
    try:
        h = hashlib.sha256()
        for table in ("items", bk.versions_table_name("items"), POSITIONS_TABLE, bk.log_table_name("items")):
            for row in conn.execute(f'SELECT * FROM "{table}" ORDER BY 1'):
                h.update(repr(row).encode())
        return h.hexdigest()[:16]
    finally:
        conn.close()


# -- set-based apply of a row group (prototype) -----------------------------------------------

_PARAM = re.compile(r"\?(\d+)")
_VALUES_FORM = re.compile(r"^(INSERT INTO .*?\)) VALUES \((.*?)\) (ON CONFLICT .*)$", re.S)
_SELECT_FORM = re.compile(r"^(INSERT INTO .*?\)) SELECT (.*?) WHERE (.*)$", re.S)
# The unguarded row statement's always-true condition: the source row is out of reach in DO UPDATE.
_ALWAYS = re.compile(r" WHERE \?\d+ IS NOT NULL AND \?\d+ IS NOT NULL$")


def set_statement(sql: str, source: str) -> str | None:
    """A row group's statement over `source AS r` (columns p1..pN) instead of per-row ?N.

    Takes the RowPlan's own statements (versions upsert, guarded or unguarded row upsert), so
    the guards and conflict clauses are the real ones; None for anything else (deletes, the
    per-row paths' statements, positions): those stay per-row.
    """
    def columns(text: str) -> str:
        return _PARAM.sub(lambda m: f"r.p{m.group(1)}", text)

    values = _VALUES_FORM.match(sql)
    if values and _PARAM.search(values.group(2)):
        head, params, conflict = values.groups()
        conflict = _ALWAYS.sub("", conflict)
        if _PARAM.search(conflict):
            return None
        return f"{head} SELECT {columns(params)} FROM {source} AS r WHERE true {conflict}"
    select = _SELECT_FORM.match(sql)
    if select and sql.startswith("INSERT INTO") and _PARAM.search(select.group(2)):
        head, params, rest = select.groups()
        return f"{head} SELECT {columns(params)} FROM {source} AS r WHERE {columns(rest)}"
    return None


def json_source(width: int) -> str:
    fields = ", ".join(f"value ->> {i} AS p{i + 1}" for i in range(width))
    return f"(SELECT {fields} FROM json_each(?1))"


class SetForm:
    """Turns a row group's executemany into one statement over the whole group."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "json" or "temp"
        self._statements: dict[tuple[str, int], str | None] = {}
        self._temp_tables: set[int] = set()
        # The group whose rows the JSON text / the temp table holds: the versions upsert and the
        # row statement of a group usually get the same list, converted once.
        self._loaded: tuple[list[Any] | None, str] = (None, "")

    def statement(self, sql: str, width: int) -> str | None:
        key = (sql, width)
        if key not in self._statements:
            source = json_source(width) if self.kind == "json" else f'temp."marmot_set_{width}"'
            self._statements[key] = set_statement(sql, source)
        return self._statements[key]

    def run(self, conn: sqlite3.Connection, sql: str, rows: list[Any], calls: list[Call] | None) -> Any:
        """The cursor of the set-based statement, or None when this call stays per-row."""
        if not rows or type(rows[0]) is not list:
            return None
        width = len(rows[0])
        statement = self.statement(sql, width)
        if statement is None:
            return None
        if self.kind == "json":
            text = self._loaded[1] if self._loaded[0] is rows else ""
            if not text:
                try:
                    text = json.dumps(rows, separators=(",", ":"), allow_nan=False)
                except (TypeError, ValueError):  # BLOBs, NaN: not JSON; per-row
                    return None
                self._loaded = (rows, text)
            if calls is not None:
                calls.append(("execute", statement, (text,)))
            return conn.execute(statement, (text,))
        table = f'temp."marmot_set_{width}"'
        if width not in self._temp_tables:
            ddl = f"CREATE TEMP TABLE IF NOT EXISTS {table} ({', '.join(f'p{i + 1}' for i in range(width))})"
            conn.execute(ddl)
            self._temp_tables.add(width)
        if self._loaded[0] is not rows:
            conn.execute(f"DELETE FROM {table}")
            conn.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * width)})", rows)
            self._loaded = (rows, "")
        return conn.execute(statement)


class ConnectionTap:
    """The applier's connection, seen through: records its calls (for the replays) and, with a
    SetForm, sends row groups through it. Everything else goes to the real connection."""

    def __init__(self, conn: sqlite3.Connection, set_form: SetForm | None = None) -> None:
        self._conn = conn
        self._set_form = set_form
        self.calls: list[Call] | None = None  # set to a list to record

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if self.calls is not None:
            self.calls.append(("execute", sql, params))
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = rows if type(rows) is list else list(rows)
        if self._set_form is not None:
            cursor = self._set_form.run(self._conn, sql, rows, self.calls)
            if cursor is not None:
                return cursor
        if self.calls is not None:
            self.calls.append(("executemany", sql, rows))
        return self._conn.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def open_applier(db: Path, set_form: SetForm | None = None, tapped: bool = False) -> tuple[BatchApplier, ConnectionTap | None]:
    """A real BatchApplier; with a tap between it and its connection when asked for."""
    if set_form is None and not tapped:
        return BatchApplier(db, RECEIVER), None
    taps: list[ConnectionTap] = []
    real_connect = applier_module.connect

    def tapped_connect(*args: Any, **kwargs: Any) -> Any:
        taps.append(ConnectionTap(real_connect(*args, **kwargs), set_form))
        return taps[-1]

    applier_module.connect = tapped_connect  # type: ignore[assignment]
    try:
        return BatchApplier(db, RECEIVER), taps[0]
    finally:
        applier_module.connect = real_connect


# -- the runs ---------------------------------------------------------------------------------------

def transactions(batches: list[GroupedBatch], per_tx: int) -> Iterator[list[tuple[GroupedBatch, str, int]]]:
    for i in range(0, len(batches), per_tx):
        yield [(batch, "s", i + j + 1) for j, batch in enumerate(batches[i:i + per_tx])]


def run_applier(db: Path, batches: list[GroupedBatch], per_tx: int, set_form: SetForm | None = None,
                record: list[Call] | None = None) -> tuple[float, int]:
    """CPU seconds of apply_many over all batches, and the rows it applied."""
    app, tap = open_applier(db, set_form, tapped=record is not None)
    if tap is not None and record is not None:
        tap.calls = record
    work = list(transactions(batches, per_tx))
    applied = 0
    gc.collect()
    t0 = time.process_time()
    for items in work:
        for outcome in app.apply_many(items):
            applied += outcome.rows_applied
    cpu = time.process_time() - t0
    app.close()
    return cpu, applied


def open_sqlite3(db: Path) -> sqlite3.Connection:
    conn = connect(db, synchronous_normal=True, cache_mib=64, temp_store_memory=True)
    guard = AppTriggerGuard()
    guard.install(conn)
    guard.set_replicated(["items"])
    return conn


def open_apsw(db: Path) -> Any:
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READWRITE)
    for pragma in APPLIER_PRAGMAS:
        for _ in conn.execute(pragma):
            pass
    guard = AppTriggerGuard()  # the same authorizer: apsw takes the same callback
    guard.set_replicated(["items"])
    conn.authorizer = guard._authorize
    return conn


def replay_sqlite3(db: Path, calls: list[Call]) -> float:
    conn = open_sqlite3(db)
    gc.collect()
    t0 = time.process_time()
    for kind, sql, params in calls:
        if kind == "execute":
            conn.execute(sql, params).fetchall()
        else:
            conn.executemany(sql, params).rowcount  # noqa: B018  (the applier reads it)
    cpu = time.process_time() - t0
    conn.close()
    return cpu


def replay_apsw(db: Path, calls: list[Call]) -> float:
    conn = open_apsw(db)
    gc.collect()
    t0 = time.process_time()
    for kind, sql, params in calls:
        if kind == "execute":
            for _ in conn.execute(sql, params):
                pass
        else:
            conn.executemany(sql, params)
            conn.total_changes()  # apsw has no rowcount: the applier would diff total_changes()
    cpu = time.process_time() - t0
    conn.close()
    return cpu


def plain_rows(batches: list[GroupedBatch]) -> list[list[tuple[Any, ...]]]:
    return [[tuple(params[:4]) for group in batch.groups for params in group.params] for batch in batches]


def run_plain(db: Path, rows: list[list[tuple[Any, ...]]], per_tx: int, library: str) -> float:
    conn = open_sqlite3(db) if library == "sqlite3" else open_apsw(db)
    gc.collect()
    t0 = time.process_time()
    for i in range(0, len(rows), per_tx):
        conn.execute("BEGIN IMMEDIATE")
        for batch in rows[i:i + per_tx]:
            conn.executemany(PLAIN_INSERT, batch)
        conn.execute("COMMIT")
    cpu = time.process_time() - t0
    conn.close()
    return cpu


def record_calls(tmp: Path, work: Workload, per_tx: int, set_form: SetForm | None) -> tuple[list[Call], str]:
    """The connection calls of one untimed applier run, and what that run left behind."""
    db = make_receiver_db(tmp / "record.db", work.prefill)
    calls: list[Call] = []
    run_applier(db, decoded(work.payloads), per_tx, set_form, record=calls)
    result = digest(db)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return calls, result


def one_run(variant: str, tmp: Path, work: Workload, per_tx: int,
            recorded: dict[str, list[Call]]) -> tuple[float, str | None]:
    """(µs of CPU per applied row, digest of the result or None for the plain inserts)."""
    payloads = work.payloads
    rows = len(payloads) * ROWS_PER_BATCH
    scratch = tmp / variant
    scratch.mkdir()
    try:
        if variant.startswith("plain-"):
            db = make_plain_db(scratch / "plain.db")
            cpu = run_plain(db, plain_rows(decoded(payloads)), per_tx, variant.removeprefix("plain-"))
            return cpu / rows * 1e6, None
        db = make_receiver_db(scratch / "receiver.db", work.prefill)
        if variant in ("applier", "set-json", "set-temp"):
            form = None if variant == "applier" else SetForm(variant.removeprefix("set-"))
            cpu, applied = run_applier(db, decoded(payloads), per_tx, form)
            if applied != rows:
                raise SystemExit(f"{variant}: applied {applied} rows, expected {rows}")
        else:
            calls = recorded["set" if variant.startswith("replay-set-") else "applier"]
            replay = replay_apsw if variant.endswith("-apsw") else replay_sqlite3
            cpu = replay(db, calls)
        return cpu / rows * 1e6, digest(db)
    finally:
        shutil.rmtree(scratch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000, help="100-row change batches per run")
    parser.add_argument("--per-tx", type=int, default=30, help="batches per apply transaction")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each variant, alternating")
    parser.add_argument("--updates", action="store_true",
                        help="every row updates a key the receiver holds at an older version (default: new keys)")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    args = parser.parse_args()

    variants = [v for v in (args.only.split(",") if args.only else VARIANTS) if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    if "applier" not in variants:
        variants.insert(0, "applier")  # the baseline of every ratio
    if apsw is None:
        skipped = [v for v in variants if v in APSW_VARIANTS]
        if skipped:
            print(f"apsw is not installed: skipping {', '.join(skipped)} (pip install apsw to measure them)")
        variants = [v for v in variants if v not in APSW_VARIANTS]

    print(f"Python sqlite3 on SQLite {sqlite3.sqlite_version}", end="")
    print(f"; apsw {apsw.apswversion()} on SQLite {apsw.sqlite_lib_version()}" if apsw else "")
    print(f"{args.batches} batches x {ROWS_PER_BATCH} rows ({'updates of held keys' if args.updates else 'new keys'}), "
          f"{args.per_tx} batches per transaction, "
          f"{args.rounds} rounds; µs of CPU per applied row")
    print(f"load average at the start: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    base = int(time.time() * 1000) << 16
    if args.updates:
        # Every key already on the receiver at an older version: each row is a winning update.
        work = Workload(make_payloads(args.batches, base + args.batches * ROWS_PER_BATCH, "updated label"),
                        make_payloads(args.batches, base, "label number"))
    else:
        work = Workload(make_payloads(args.batches, base, "label number"), [])
    tmp = Path(tempfile.mkdtemp(prefix="apply-levers-"))
    try:
        recorded: dict[str, list[Call]] = {}
        expected: dict[str, str] = {}
        if any(v.startswith("replay-") and not v.startswith("replay-set-") for v in variants):
            recorded["applier"], expected["applier"] = record_calls(tmp, work, args.per_tx, None)
        if any(v.startswith("replay-set-") for v in variants):
            recorded["set"], expected["set"] = record_calls(tmp, work, args.per_tx, SetForm("json"))
        # Warm-up, untimed: each variant's code paths once on a few batches (not the replays,
        # whose recordings belong to the whole workload; their code is a plain loop).
        few = Workload(work.payloads[:args.per_tx], work.prefill[:args.per_tx])
        for variant in variants:
            if not variant.startswith("replay-"):
                one_run(variant, tmp, few, args.per_tx, recorded)
        figures: dict[str, list[float]] = {v: [] for v in variants}
        digests: dict[str, set[str]] = {v: set() for v in variants}
        for round_no in range(args.rounds):
            shift = round_no % len(variants)
            order = variants[shift:] + variants[:shift]
            for variant in order:
                us, result = one_run(variant, tmp, work, args.per_tx, recorded)
                figures[variant].append(us)
                if result is not None:
                    digests[variant].add(result)
            print(f"round {round_no + 1}: " + "  ".join(f"{v} {figures[v][-1]:.2f}" for v in order), flush=True)
        report(variants, figures, digests, expected)
        print(f"load average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(tmp)
    return 0


def report(variants: list[str], figures: dict[str, list[float]], digests: dict[str, set[str]],
           expected: dict[str, str]) -> None:
    base = figures["applier"]
    reference = digests["applier"] | set(expected.values())
    print()
    print(f"{'variant':<20} {'runs (µs of CPU per row)':<40} {'median':>7}  ratio to applier (median of rounds)")
    for variant in variants:
        runs = figures[variant]
        ratios = [value / b for value, b in zip(runs, base)]
        same = "" if variant.startswith("plain-") or digests[variant] <= reference else "  RESULT DIFFERS"
        print(f"{variant:<20} {' / '.join(f'{v:.2f}' for v in runs):<40} {statistics.median(runs):7.2f}  "
              f"{statistics.median(ratios):.3f}x{same}")
    if len(reference) != 1:
        print(f"results differ between the applier runs and the recordings: {sorted(reference)}")
    pairs: list[tuple[str, str, str]] = [
        ("replay-apsw", "replay-sqlite3", "apsw on the applier's statements"),
        ("replay-set-apsw", "replay-set-sqlite3", "apsw on the set-json statements"),
        ("plain-apsw", "plain-sqlite3", "apsw on plain inserts"),
    ]
    median: Callable[[list[float]], float] = statistics.median
    for new, old, label in pairs:
        if new in figures and old in figures:
            saved = [o - n for n, o in zip(figures[new], figures[old])]
            ratios = [n / o for n, o in zip(figures[new], figures[old])]
            print(f"{label}: {median(ratios):.3f}x the sqlite3 figure (median of rounds); saves "
                  f"{median(saved):.2f} µs/row = {median(saved) / median(base):.1%} of the applier's CPU per row")


if __name__ == "__main__":
    sys.exit(main())
