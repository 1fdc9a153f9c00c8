"""One located mistake in a spec, and how it is printed: `file:line:col: $.json.path: message`."""

from __future__ import annotations

import re
from dataclasses import dataclass

JsonPath = tuple[str | int, ...]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_json_path(path: JsonPath) -> str:
    """`("nodes", 1, "db")` -> `$.nodes[1].db`; keys that are not identifiers are bracketed."""
    text = "$"
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _IDENTIFIER.match(part):
            text += f".{part}"
        else:
            text += "[" + repr(part) + "]"
    return text


@dataclass(frozen=True)
class Mark:
    """A 1-based position in the source text."""

    line: int
    column: int


@dataclass(frozen=True)
class Problem:
    source: str
    mark: Mark | None
    path: JsonPath | None
    message: str

    def format(self) -> str:
        parts = [self.source]
        if self.mark is not None:
            parts.append(f"{self.mark.line}:{self.mark.column}")
        head = ":".join(parts)
        if self.path is not None:
            return f"{head}: {format_json_path(self.path)}: {self.message}"
        return f"{head}: {self.message}"


def short_repr(value: object, limit: int = 60) -> str:
    """repr() cut to a readable length: messages quote the offending value, not a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
