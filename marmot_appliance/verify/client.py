"""The caller's side of the verify protocol: discover nodes, ask one node, read stream ends."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import nats.errors

from marmot_appliance.verify import protocol

REQUEST_TIMEOUT_S = 120.0  # a full digest of a large table on a busy node takes a while
HELLO_TIMEOUT_S = 5.0


class NodeUnreachable(protocol.VerifyProtocolError):
    """A node did not answer (down, partitioned, or not running a verify service)."""


@dataclass(frozen=True)
class NodeInfo:
    name: str
    id: int
    tables: tuple[str, ...]
    replicate: bool
    publish: bool
    streams: tuple[str, ...] = field(default=())

    @classmethod
    def from_hello(cls, body: dict) -> "NodeInfo":
        return cls(str(body["node"]), int(body["id"]), tuple(body.get("tables") or ()), bool(body.get("replicate", True)),
                   bool(body.get("publish", True)), tuple(body.get("streams") or ()))


class VerifyClient:
    def __init__(self, nc: Any, stream_prefix: str, request_timeout_s: float = REQUEST_TIMEOUT_S):
        self.nc = nc
        self.js = nc.jetstream(timeout=30.0)
        self.stream_prefix = stream_prefix
        self.request_timeout_s = request_timeout_s

    async def request(self, node_id: int, message: dict, timeout_s: float | None = None) -> dict:
        subject = protocol.node_subject(self.stream_prefix, node_id)
        try:
            msg = await self.nc.request(subject, protocol.encode(message), timeout=timeout_s or self.request_timeout_s)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError) as exc:
            raise NodeUnreachable(f"node id {node_id} did not answer {message.get('op')!r} on {subject}") from exc
        return protocol.reply_body(protocol.decode(msg.data))

    async def hello(self, node_id: int) -> NodeInfo:
        return NodeInfo.from_hello(await self.request(node_id, {"op": protocol.OP_HELLO}, HELLO_TIMEOUT_S))

    async def discover(self, wait_s: float = 2.0, enough: int | None = None) -> list[NodeInfo]:
        """Every node that answers `hello` on the well-known subject within wait_s (or the first `enough`)."""
        inbox = self.nc.new_inbox()
        answers: list[NodeInfo] = []
        subscription = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(protocol.all_nodes_subject(self.stream_prefix),
                                  protocol.encode({"op": protocol.OP_HELLO}), reply=inbox)
            deadline = time.monotonic() + wait_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await subscription.next_msg(timeout=left)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    break
                try:
                    answers.append(NodeInfo.from_hello(protocol.reply_body(protocol.decode(msg.data))))
                except (protocol.VerifyProtocolError, KeyError, TypeError, ValueError):
                    continue
                if enough is not None and len({info.id for info in answers}) >= enough:
                    break
        finally:
            await subscription.unsubscribe()
        unique = {info.id: info for info in answers}
        return [unique[node_id] for node_id in sorted(unique)]

    async def stream_last_seqs(self, streams: list[str]) -> dict[str, int]:
        out = {}
        for stream in streams:
            info = await self.js.stream_info(stream)
            out[stream] = int(info.state.last_seq)
        return out
