"""Typed errors. The CLI turns every `MarmotError` into a message and exit code 1."""

from __future__ import annotations

import re


class MarmotError(Exception):
    """Base for every error that is the user's or the environment's, not a bug."""


class TransientError(MarmotError):
    """Nothing was changed and the cause passes by itself (e.g. a lock held past busy_timeout):
    retry later with back-off, never give up on the work."""


class SpecError(MarmotError):
    """A cluster spec is invalid. `problems` holds one located message per mistake."""

    def __init__(self, problems: list[str]):
        # Natural order, so "spec.yaml:9:1" sorts before "spec.yaml:10:1".
        self.problems = sorted(problems, key=_natural_sort_key)
        super().__init__("\n".join(self.problems))


def _natural_sort_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class DatabaseStateError(MarmotError):
    """The database is in a state the runtime refuses to work with (e.g. not in WAL mode)."""


class NatsServerError(MarmotError):
    """A nats-server could not be configured or started."""
