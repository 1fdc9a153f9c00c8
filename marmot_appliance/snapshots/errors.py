"""Typed snapshot errors. All are `MarmotError`s: the CLI prints them as one message, exit 1."""

from __future__ import annotations

from marmot_appliance.errors import MarmotError


class SnapshotError(MarmotError):
    """A snapshot could not be saved, found, transferred or restored."""


class SnapshotSkipped(SnapshotError):
    """A save was not needed or not allowed right now; nothing was changed."""


class SnapshotBusyError(SnapshotSkipped):
    """Another node holds the cluster-wide snapshot lease."""

    def __init__(self, holder: str):
        self.holder = holder
        super().__init__(f"another snapshot is being saved right now (lease held by {holder}); try again later")


class SnapshotUpToDate(SnapshotSkipped):
    """The newest snapshot already reflects every position this node has applied."""


class SnapshotBehind(SnapshotSkipped):
    """This node is behind the newest snapshot on some stream: its copy would be worse."""


class LeaseLostError(SnapshotError):
    """The lease expired or was taken over while saving; the save was abandoned unpublished."""


class ChecksumMismatchError(SnapshotError):
    """A downloaded snapshot's bytes do not match the checksum recorded when it was saved."""


class NoSnapshotError(SnapshotError):
    """No usable snapshot exists (none saved, or every kept one failed verification)."""


class RestoreRefusedError(SnapshotError):
    """Restoring now would drop local changes that were not yet published."""
