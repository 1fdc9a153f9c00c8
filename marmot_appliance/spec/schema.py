"""Where the cluster-spec JSON Schema lives, and loading it once."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from marmot_appliance.errors import MarmotError

SCHEMA_FILE = "cluster-v1.schema.json"


def schema_path() -> Path:
    """The schema file: inside the installed package (wheel), else the repository's `schemas/`."""
    package_dir = Path(__file__).resolve().parent.parent  # marmot_appliance/
    candidates = (package_dir / "schemas" / SCHEMA_FILE, package_dir.parent / "schemas" / SCHEMA_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MarmotError(f"cluster spec schema {SCHEMA_FILE} not found (looked in {', '.join(map(str, candidates))})")


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(schema_path().read_text(encoding="utf-8"))
    return schema
