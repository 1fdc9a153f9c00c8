"""Compare every replicated table across the nodes: converged, diverged, or still catching up.

1. Each node sends its bucket digests of the table (verify/table_state.py). Equal everywhere:
   converged.
2. For the buckets that differ, each node lists its rows (key, row hash, version); the keys whose
   rows differ are then looked up on every node at once (tombstones and versions included).
3. A key is judged by its newest (version, origin) across the nodes:
   - the nodes holding that newest version disagree on the row (or on whether it was deleted):
     **diverged** at once. Equal versions must mean equal rows; lag cannot explain it.
   - some node holds an older version: maybe it is only behind. Wait for a *barrier*: every
     node has published its own writes up to that version (its oldest unpublished log row is
     newer), then every node has applied every shard stream up to the stream's last sequence
     read after that. A node still older than the newest version seen before the barrier
     missed a change it has applied past: **diverged**. Keys that agree now are settled; keys
     overtaken by newer writes go round again.
4. Past the deadline with keys still unsettled: **catching up** (the caller exits 2).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from marmot_appliance.verify import protocol
from marmot_appliance.verify.client import NodeInfo, VerifyClient
from marmot_appliance.verify.table_state import ROW_HASH_BYTES, KeyState, key_bytes

DEFAULT_BUCKETS = 4096  # ~250 rows a bucket at a million rows; 64 KiB of digests a node
KEYS_PER_REQUEST = 4000  # rows listed per keys/lookup request, well under a 1 MB max_payload
POLL_S = 0.2

CONVERGED = "converged"
DIVERGED = "diverged"
CATCHING_UP = "catching_up"
SCHEMA_DIFFERS = "schema_differs"
UNREACHABLE = "unreachable"

SAME_VERSION_DIFFERENT_ROW = "same version, different rows"
MISSED_VERSION = "missed a version it has applied past"


@dataclass
class KeyFinding:
    key: tuple[Any, ...]
    reason: str
    states: dict[str, KeyState]  # node name -> its state of the key
    newest: tuple[int, int]
    newest_nodes: list[str]


@dataclass
class TableResult:
    table: str
    status: str
    nodes: list[str]
    rows: dict[str, int] = field(default_factory=dict)
    differing_keys: int = 0
    findings: list[KeyFinding] = field(default_factory=list)  # every differing key found
    detail: str = ""


class Deadline:
    def __init__(self, timeout_s: float):
        self.at = time.monotonic() + timeout_s

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at


class TableComparison:
    """One table across its holders (the replicating nodes that have it)."""

    def __init__(self, client: VerifyClient, table: str, holders: list[NodeInfo], everyone: list[NodeInfo],
                 deadline: Deadline, buckets: int = DEFAULT_BUCKETS):
        self.client = client
        self.table = table
        self.holders = holders
        self.everyone = everyone
        self.deadline = deadline
        self.buckets = buckets
        self.names = [node.name for node in holders]

    async def run(self) -> TableResult:
        while True:
            digests = await self._ask_all({"op": protocol.OP_DIGEST, "table": self.table, "buckets": self.buckets})
            rows = {name: int(d["rows"]) for name, d in digests.items()}
            shapes = {(tuple(d["columns"]), tuple(d["key"])) for d in digests.values()}
            if len(shapes) > 1:
                if self.deadline.passed:
                    return TableResult(self.table, SCHEMA_DIFFERS, self.names, rows,
                                       detail="the nodes have different columns or primary keys for this table")
                await asyncio.sleep(1.0)  # a rolling schema change may be under way
                continue
            differing = _differing_buckets(digests, self.buckets)
            if not differing:
                return TableResult(self.table, CONVERGED, self.names, rows)
            candidates = await self._differing_keys(digests, differing)
            if not candidates:
                if self.deadline.passed:
                    return TableResult(self.table, CATCHING_UP, self.names, rows, detail="rows kept changing")
                await asyncio.sleep(POLL_S)  # the rows moved between the digest and the listing: look again
                continue
            return await self._judge(candidates, rows)

    # -- steps -------------------------------------------------------------------------------

    async def _ask_all(self, message: dict, nodes: list[NodeInfo] | None = None) -> dict[str, dict]:
        nodes = nodes if nodes is not None else self.holders
        answers = await asyncio.gather(*(self.client.request(node.id, message) for node in nodes))
        return {node.name: answer for node, answer in zip(nodes, answers)}

    async def _differing_keys(self, digests: dict[str, dict], differing: list[int]) -> dict[bytes, tuple]:
        """key bytes -> key of every row whose listing differs between nodes, in the given buckets."""
        most = [max(int(d["counts"][b]) for d in digests.values()) for b in differing]
        chunks: list[list[int]] = [[]]
        rows_in_chunk = 0
        for bucket, count in zip(differing, most):
            if chunks[-1] and rows_in_chunk + count > KEYS_PER_REQUEST:
                chunks.append([])
                rows_in_chunk = 0
            chunks[-1].append(bucket)
            rows_in_chunk += count
        listed: dict[str, dict[bytes, bytes]] = {name: {} for name in self.names}  # key bytes -> row hash
        keys: dict[bytes, tuple] = {}
        for chunk in chunks:
            answers = await self._ask_all({"op": protocol.OP_KEYS, "table": self.table, "buckets": self.buckets,
                                           "bucket_ids": chunk, "scope": differing if len(chunks) > 1 else None})
            for name, answer in answers.items():
                mine = listed[name]
                for key, hashed in answer["keys"]:
                    kb = key_bytes(key)
                    mine[kb] = hashed
                    keys.setdefault(kb, tuple(key))
        return {kb: key for kb, key in keys.items() if len({listed[name].get(kb) for name in self.names}) > 1}

    async def _lookup(self, keys: dict[bytes, tuple]) -> dict[bytes, dict[str, KeyState]]:
        observed: dict[bytes, dict[str, KeyState]] = {kb: {} for kb in keys}
        items = list(keys.items())
        for start in range(0, len(items), KEYS_PER_REQUEST):
            chunk = items[start:start + KEYS_PER_REQUEST]
            answers = await self._ask_all({"op": protocol.OP_LOOKUP, "table": self.table,
                                           "keys": [list(key) for _kb, key in chunk]})
            for name, answer in answers.items():
                for (kb, _key), item in zip(chunk, answer["keys"]):
                    observed[kb][name] = KeyState.from_wire(item)
        return observed

    async def _judge(self, candidates: dict[bytes, tuple], rows: dict[str, int]) -> TableResult:
        found: dict[bytes, KeyFinding] = {}
        waiting = 0  # keys only nodes holding rows of this table back are behind on
        held_by: set[str] = set()
        observed = await self._lookup(candidates)
        while True:
            unsettled: dict[bytes, tuple[int, int]] = {}
            for kb, states in observed.items():
                verdict = _judge_key(states)
                if verdict is None:
                    continue
                if isinstance(verdict, KeyFinding):
                    found[kb] = verdict
                else:
                    unsettled[kb] = verdict
            if not unsettled:
                break
            if not await self._barrier(max(version for version, _origin in unsettled.values())):
                return self._result(found, rows, catching_up=len(unsettled) + waiting, holding_back=sorted(held_by))
            observed = await self._lookup({kb: candidates[kb] for kb in unsettled})
            progress = await self._ask_all({"op": protocol.OP_PROGRESS})
            holding_back = {name for name, p in progress.items()
                            if int((p.get("waiting") or {}).get(self.table, 0)) > 0}
            for kb, states in list(observed.items()):
                newest_before = unsettled[kb]
                behind = [name for name, s in states.items() if (s.version, s.origin) < newest_before]
                if behind and set(behind) <= holding_back:
                    waiting += 1  # parked or held rows of this table there: it may still apply them
                    held_by.update(behind)
                    del observed[kb]
                elif behind:
                    found[kb] = _finding(states, MISSED_VERSION, newest_before)
            observed = {kb: states for kb, states in observed.items() if kb not in found}
        return self._result(found, rows, catching_up=waiting, holding_back=sorted(held_by))

    async def _barrier(self, newest_version: int) -> bool:
        """Wait until every node published up to newest_version and applied what was in the streams then."""
        while True:
            progress = await self._ask_all({"op": protocol.OP_PROGRESS}, self.everyone)
            if all(p.get("unpublished_from") is None or int(p["unpublished_from"]) > newest_version
                   for p in progress.values()):
                break
            if self.deadline.passed:
                return False
            await asyncio.sleep(POLL_S)
        return await wait_streams_applied(self.client, self.holders, self.deadline)

    def _result(self, found: dict[bytes, KeyFinding], rows: dict[str, int], catching_up: int = 0,
                holding_back: list[str] | None = None) -> TableResult:
        findings = sorted(found.values(), key=lambda f: repr(f.key))
        if findings:
            return TableResult(self.table, DIVERGED, self.names, rows, len(findings), findings)
        if catching_up:
            detail = f"{catching_up} key(s) still differ between nodes that are behind"
            if holding_back:
                detail += f"; {', '.join(holding_back)} hold rows of this table back (parked or held, see /health)"
            return TableResult(self.table, CATCHING_UP, self.names, rows, detail=detail)
        return TableResult(self.table, CONVERGED, self.names, rows)


async def wait_streams_applied(client: VerifyClient, nodes: list[NodeInfo], deadline: "Deadline") -> bool:
    """Wait until every node applied every shard stream up to its last sequence as of now."""
    streams = sorted({stream for node in nodes for stream in node.streams})
    last = await client.stream_last_seqs(streams)
    while True:
        answers = await asyncio.gather(*(client.request(node.id, {"op": protocol.OP_PROGRESS}) for node in nodes))
        if all(int(p["positions"].get(stream, 0)) >= seq for p in answers for stream, seq in last.items()):
            return True
        if deadline.passed:
            return False
        await asyncio.sleep(POLL_S)


def _differing_buckets(digests: dict[str, dict], buckets: int) -> list[int]:
    sums = [d["sums"] for d in digests.values()]
    counts = [d["counts"] for d in digests.values()]
    differing = []
    for bucket in range(buckets):
        start = bucket * ROW_HASH_BYTES
        if len({s[start:start + ROW_HASH_BYTES] for s in sums}) > 1 or len({c[bucket] for c in counts}) > 1:
            differing.append(bucket)
    return differing


def _judge_key(states: dict[str, KeyState]) -> KeyFinding | tuple[int, int] | None:
    """None: the nodes agree. A finding: diverged. (version, origin): unsettled, newest seen."""
    if len({s.row_hash for s in states.values()}) == 1:
        return None
    newest = max((s.version, s.origin) for s in states.values())
    at_newest = {s.row_hash for s in states.values() if (s.version, s.origin) == newest}
    if len(at_newest) > 1:
        return _finding(states, SAME_VERSION_DIFFERENT_ROW, newest)
    return newest


def _finding(states: dict[str, KeyState], reason: str, newest: tuple[int, int]) -> KeyFinding:
    key = next(iter(states.values())).key
    holders = sorted(name for name, s in states.items() if (s.version, s.origin) >= newest)
    return KeyFinding(key, reason, dict(states), newest, holders)


@dataclass
class VerifyReport:
    nodes: list[NodeInfo]
    unreachable: list[str]
    tables: list[TableResult]
    errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if any(t.status == DIVERGED for t in self.tables):
            return 1
        if self.unreachable or self.errors or any(t.status != CONVERGED for t in self.tables):
            return 2
        return 0

    @property
    def result(self) -> str:
        return {0: CONVERGED, 1: DIVERGED, 2: "undecided"}[self.exit_code]


async def verify_cluster(client: VerifyClient, expected: list[tuple[str, int]] | None, tables: list[str] | None,
                         timeout_s: float, buckets: int = DEFAULT_BUCKETS, discover_s: float = 2.0,
                         expect_count: int | None = None) -> VerifyReport:
    """Compare the tables (all replicated ones when None) across the nodes.

    expected: (name, id) of every node that must answer (spec mode); None: whoever answers the
    discovery within discover_s (flag mode), at least expect_count of them when given.
    """
    deadline = Deadline(timeout_s)
    nodes, unreachable = await find_nodes(client, expected, discover_s, expect_count)
    report = VerifyReport(nodes, unreachable, [])
    replicating = [node for node in nodes if node.replicate]
    names = sorted({t for node in replicating for t in node.tables})
    if tables:
        names = [t for t in tables if t in names]
        report.errors.extend(f"table {t!r} is not replicated on any node that answered" for t in tables if t not in names)
    for table in names:
        holders = [node for node in replicating if table in node.tables]
        try:
            result = await TableComparison(client, table, holders, nodes, deadline, buckets).run()
        except protocol.VerifyProtocolError as exc:
            result = TableResult(table, UNREACHABLE, [n.name for n in holders], detail=str(exc))
        report.tables.append(result)
    return report


async def find_nodes(client: VerifyClient, expected: list[tuple[str, int]] | None, discover_s: float,
                     expect_count: int | None = None) -> tuple[list[NodeInfo], list[str]]:
    if expected is None:
        nodes = await client.discover(discover_s, expect_count)
        missing = []
        if expect_count is not None and len(nodes) < expect_count:
            missing = [f"{expect_count - len(nodes)} of {expect_count} expected node(s)"]
        return nodes, missing

    async def one(name: str, node_id: int):
        try:
            return await client.hello(node_id)
        except protocol.VerifyProtocolError:
            return name

    answers = await asyncio.gather(*(one(name, node_id) for name, node_id in expected))
    return [a for a in answers if isinstance(a, NodeInfo)], [a for a in answers if isinstance(a, str)]
