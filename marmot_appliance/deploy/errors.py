"""Errors of the remote deployment path."""

from marmot_appliance.errors import MarmotError


class DeployError(MarmotError):
    """The controller could not prepare or run a deployment."""
