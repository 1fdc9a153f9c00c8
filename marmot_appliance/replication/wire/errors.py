"""The codec's one error: whatever is wrong with a payload, or with a batch to encode."""

from __future__ import annotations

from marmot_appliance.errors import MarmotError


class CodecError(MarmotError):
    """A payload is not a valid change batch, or a batch cannot be encoded."""


def malformed(message: str) -> CodecError:
    return CodecError(f"malformed change batch: {message}")
