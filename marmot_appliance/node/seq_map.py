"""The seed's `seq-map-path`: a CBOR copy {stream: applied seq} for operators and old tooling.

The database's positions table is the truth (written with the rows it applied); this file is
only a copy, rewritten atomically (temp file + rename) when the positions move.
"""

from __future__ import annotations

import os
from pathlib import Path

import cbor2


def write_seq_map(path: str | Path, positions: dict[str, int]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as handle:
        handle.write(cbor2.dumps({str(k): int(v) for k, v in sorted(positions.items())}))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, target)


def read_seq_map(path: str | Path) -> dict[str, int]:
    data = cbor2.loads(Path(path).read_bytes())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a CBOR map")
    return {str(k): int(v) for k, v in data.items()}
