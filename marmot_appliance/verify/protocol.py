"""The verify request/reply protocol: subjects and message encoding.

Every node runtime answers on two core-NATS subjects (no JetStream), named after the cluster's
stream prefix so two clusters on one NATS system never answer each other:

    marmot.verify.<stream_prefix>.all        every node answers "hello" (discovery, like $SRV.PING)
    marmot.verify.<stream_prefix>.node.<id>  one node: digests, keys, lookups, progress, republish,
                                             relog

Requests and replies are CBOR maps (SQLite values keep their storage class: 1, 1.0, '1' and
b'1' stay apart). A request is {"op": ..., ...}; a reply is {"ok": true, ...} or
{"ok": false, "error": "..."}.
"""

from __future__ import annotations

from typing import Any

import cbor2

from marmot_appliance.errors import MarmotError

SUBJECT_ROOT = "marmot.verify"
PROTOCOL_VERSION = 1

OP_HELLO = "hello"
OP_DIGEST = "digest"
OP_KEYS = "keys"
OP_LOOKUP = "lookup"
OP_PROGRESS = "progress"
OP_REPUBLISH = "republish"
OP_RELOG = "relog"  # publish again every row this node originated (node/gap_closer.py)


class VerifyProtocolError(MarmotError):
    """A verify request or reply that cannot be understood, or a node that answered an error."""


def subject_prefix(stream_prefix: str) -> str:
    return f"{SUBJECT_ROOT}.{stream_prefix}"


def all_nodes_subject(stream_prefix: str) -> str:
    return f"{subject_prefix(stream_prefix)}.all"


def node_subject(stream_prefix: str, node_id: int) -> str:
    return f"{subject_prefix(stream_prefix)}.node.{int(node_id)}"


def encode(message: dict[str, Any]) -> bytes:
    return cbor2.dumps(message)


def decode(payload: bytes) -> dict[str, Any]:
    try:
        message = cbor2.loads(payload)
    except Exception as exc:  # noqa: BLE001 - cbor2 raises several types for bad input
        raise VerifyProtocolError(f"undecodable verify message: {exc}") from exc
    if not isinstance(message, dict):
        raise VerifyProtocolError("a verify message must be a map")
    return message


def reply_body(message: dict[str, Any]) -> dict[str, Any]:
    """The body of a successful reply; a node's error reply becomes VerifyProtocolError."""
    if not message.get("ok"):
        raise VerifyProtocolError(str(message.get("error") or "the node answered an error"))
    return message
