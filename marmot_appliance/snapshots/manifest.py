"""The snapshot manifest: which snapshots exist, newest first, and what each one reflects.

The object store holds the snapshot files; one key in a KV bucket holds this manifest. A save
uploads and verifies its object first and publishes the manifest last, with a compare-and-set on
the manifest's revision, so a reader either sees the previous complete list or the new complete
list, never a half-written snapshot. Finding the newest snapshot is one KV read, not a listing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

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

    def covers(self, positions: dict[str, int]) -> bool:
        """True when this snapshot reflects at least `positions` on every stream."""
        return all(self.positions.get(stream, 0) >= seq for stream, seq in positions.items())

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
