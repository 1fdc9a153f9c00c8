"""Typed errors. The CLI turns every `MarmotError` into a message and exit code 1."""

from __future__ import annotations


class MarmotError(Exception):
    """Base for every error that is the user's or the environment's, not a bug."""


class SpecError(MarmotError):
    """A cluster spec is invalid. `problems` holds one located message per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = sorted(problems)
        super().__init__("\n".join(self.problems))


class DatabaseStateError(MarmotError):
    """The database is in a state the runtime refuses to work with (e.g. not in WAL mode)."""


class NatsServerError(MarmotError):
    """A nats-server could not be configured or started."""
