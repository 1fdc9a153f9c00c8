"""Errors of the local appliance (all `MarmotError`s: the CLI prints them, exit 1)."""

from __future__ import annotations

from marmot_appliance.errors import MarmotError


class ApplianceError(MarmotError):
    """apply/status/destroy could not do what was asked (the message says what and why)."""


class StateLockedError(ApplianceError):
    """Another apply or destroy holds the state directory."""


class UnhealthyError(ApplianceError):
    """A process did not become healthy in time; the message names it and tails its log."""
