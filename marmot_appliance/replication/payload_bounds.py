"""How much of an unusable payload the database keeps (dead letters, and parked rows' overflow).

A dead-lettered message is kept for an operator to look at, not to be replayed byte for byte:
keeping every payload whole let one hostile or oversized message grow the database by its full
size (issue 11: "dead-letter and parked tables keep whole payloads with no bound"). Anything
longer than MAX_KEPT_PAYLOAD_BYTES keeps its first bytes and says so in the reason, so the
record still shows what arrived and how large it was. One helper, shared by every table that
stores payloads (docs/replication.md, "Dead letters").
"""

from __future__ import annotations

MAX_KEPT_PAYLOAD_BYTES = 64 * 1024


def bounded_payload(payload: bytes, reason: str, limit: int = MAX_KEPT_PAYLOAD_BYTES) -> tuple[bytes, str]:
    """(payload, reason) to store: the payload cut to `limit` bytes, the reason noting any cut."""
    payload = bytes(payload)
    if len(payload) <= limit:
        return payload, reason
    return payload[:limit], f"{reason} [payload truncated: first {limit} of {len(payload)} bytes kept]"
