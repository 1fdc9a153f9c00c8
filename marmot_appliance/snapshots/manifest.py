"""The snapshot manifest: which snapshots exist, newest first, and what each one reflects.

The object store holds the snapshot files; one key in a KV bucket holds this manifest. A save
uploads and verifies its object first and publishes the manifest last, with a compare-and-set on
the manifest's revision, so a reader either sees the previous complete list or the new complete
list, never a half-written snapshot. Finding the newest snapshot is one KV read, not a listing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from marmot_appliance.snapshots.errors import SnapshotError

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class SnapshotInfo:
    """One saved snapshot.

    positions maps every shard stream to the last sequence applied in the copied database: a
    restoring node replays each stream from positions[stream] + 1.
    """

    name: str  # object name in the snapshot bucket
    sha256: str  # hex digest of the whole file
    size: int  # bytes
    created: float  # unix time on the saving node (for people; never compared across nodes)
    node: str  # saving node's name
    node_id: int
    generation: int  # 1, 2, 3... in manifest order; the newest has the highest
    positions: dict[str, int] = field(default_factory=dict)
    # The saver's table selection ({"include": [...], "exclude": [...]}), the fingerprint of each
    # table it replicated, and the tables in the file it did *not* replicate (their rows are the
    # saver's local data, not the cluster's). None: saved by a version that did not record them.
    selection: dict[str, list[str]] | None = None
    tables: dict[str, str] | None = None
    local_tables: tuple[str, ...] | None = None

    def covers(self, positions: dict[str, int]) -> bool:
        """True when this snapshot reflects at least `positions` on every stream."""
        return all(self.positions.get(stream, 0) >= seq for stream, seq in positions.items())

    def behind(self, positions: dict[str, int]) -> dict[str, tuple[int, int]]:
        """Streams where `positions` are below this snapshot's: stream -> (theirs, ours)."""
        return {
            stream: (positions.get(stream, 0), seq)
            for stream, seq in self.positions.items()
            if positions.get(stream, 0) < seq
        }

    def selection_problem(self, replicates: Callable[[str], bool]) -> str | None:
        """Why a node replicating the tables `replicates` accepts must not restore this, or None.

        The snapshot's rows of a table its saver did not replicate are that node's local data;
        a restorer that replicates the table would take them for the cluster's and publish them.
        """
        if self.local_tables is None:
            return (f"snapshot {self.name} was saved by a version that does not record its table selection, "
                    "so it may hold another node's local rows")
        foreign = sorted(name for name in self.local_tables if replicates(name))
        if foreign:
            return (f"snapshot {self.name} was saved by {self.node}, which does not replicate "
                    f"{', '.join(foreign)} (its rows there are {self.node}'s local data)")
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SnapshotInfo":
        try:
            return cls(
                name=str(data["name"]),
                sha256=str(data["sha256"]),
                size=int(data["size"]),
                created=float(data["created"]),
                node=str(data["node"]),
                node_id=int(data["node_id"]),
                generation=int(data["generation"]),
                positions={str(k): int(v) for k, v in dict(data.get("positions") or {}).items()},
                selection=(
                    {str(k): [str(t) for t in v] for k, v in dict(data["selection"]).items()}
                    if data.get("selection") is not None else None
                ),
                tables=(
                    {str(k): str(v) for k, v in dict(data["tables"]).items()} if data.get("tables") is not None else None
                ),
                local_tables=(
                    tuple(str(t) for t in data["local_tables"]) if data.get("local_tables") is not None else None
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot manifest entry is malformed: {exc!r}") from exc


@dataclass(frozen=True)
class Manifest:
    snapshots: tuple[SnapshotInfo, ...] = ()  # newest first

    @property
    def newest(self) -> SnapshotInfo | None:
        return self.snapshots[0] if self.snapshots else None

    @property
    def next_generation(self) -> int:
        return (self.snapshots[0].generation + 1) if self.snapshots else 1

    def with_new(self, info: SnapshotInfo, keep: int) -> tuple["Manifest", tuple[SnapshotInfo, ...]]:
        """The manifest after adding `info`, and the snapshots that fall out of `keep`."""
        ordered = (info, *self.snapshots)
        keep = max(1, keep)
        return Manifest(ordered[:keep]), ordered[keep:]

    def encode(self) -> bytes:
        body = {"format": MANIFEST_FORMAT, "snapshots": [s.to_dict() for s in self.snapshots]}
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> "Manifest":
        try:
            body = json.loads(payload)
        except ValueError as exc:
            raise SnapshotError(f"snapshot manifest is not valid JSON: {exc}") from exc
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
            found = body.get("format") if isinstance(body, dict) else type(body).__name__
            raise SnapshotError(
                f"snapshot manifest format {found!r} is not supported (this version reads {MANIFEST_FORMAT})"
            )
        entries = body.get("snapshots")
        if not isinstance(entries, list):
            raise SnapshotError("snapshot manifest has no 'snapshots' list")
        snapshots = tuple(SnapshotInfo.from_dict(e) for e in entries)
        return cls(tuple(sorted(snapshots, key=lambda s: s.generation, reverse=True)))
