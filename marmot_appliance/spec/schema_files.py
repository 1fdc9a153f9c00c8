"""The spec's `schema:` files, checked while the spec loads: each is read and run through
SQLite (marmot_appliance.schema.sqlfiles), and every problem is located in the SQL file
(`notes.sql:3:14: near "TEXTT": syntax error`), or at the `schema:` entry when the file itself
cannot be read."""

from __future__ import annotations

import os
from pathlib import Path

from .problems import Problem
from .yaml_source import SourceDocument


def shown_path(source_name: str, entry: str) -> str:
    """How messages name a schema file: next to the spec as the user named the spec."""
    if os.path.isabs(entry):
        return entry
    return os.path.normpath(os.path.join(os.path.dirname(source_name), entry))


def schema_file_problems(document: SourceDocument, base_dir: Path) -> list[Problem]:
    from marmot_appliance.schema.sqlfiles import read_schema_files  # sqlite3 only when a spec has a schema

    data = document.data
    entries = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, str) and entry for entry in entries):
        return []  # the JSON Schema reports wrong types
    files = [(shown_path(document.source, entry), base_dir / entry) for entry in entries]
    _declared, problems = read_schema_files(files)
    located = []
    for problem in problems:
        if problem.mark is None:  # the file itself: point at its entry in the spec
            index = next(i for i, (shown, _path) in enumerate(files) if shown == problem.source)
            located.append(document.problem(("schema", index), f"{files[index][1]}: {problem.message}"))
        else:
            located.append(problem)
    return located


def check_schema_files(paths: list[str]) -> None:
    """Raise SpecError with every located problem of these files (no spec involved)."""
    from marmot_appliance.errors import SpecError
    from marmot_appliance.schema.sqlfiles import read_schema_files

    _declared, problems = read_schema_files([(path, Path(path)) for path in paths])
    if problems:
        raise SpecError([problem.format() for problem in problems])
