"""The verify service of one node runtime: answers digests, keys and lookups over NATS.

Database work runs on a thread of its own (replication/db_thread.DbThread) with a read-only
connection (verify/table_state.py), so a full-table digest never blocks the event loop (acks,
heartbeats, /health) nor the application's writes. Requests are answered one at a time per
subject; a reply larger than the server's max_payload is answered with an error that tells the
caller to ask for less.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from marmot_appliance.errors import MarmotError
from marmot_appliance.replication.db_thread import DbThread
from marmot_appliance.verify import protocol
from marmot_appliance.verify.republish import fresh_version, publish_repair, repair_rows
from marmot_appliance.verify.table_state import KeyState, TableNotReplicated, TableStateReader

log = logging.getLogger(__name__)

MAX_BUCKETS = 1 << 16


class VerifyService:
    """Subscribes a node's verify subjects and answers requests until stop()."""

    def __init__(self, nc: Any, node: Any, replication: Any, db_path: str,
                 applied: Callable[[], dict[str, int]] | None = None, js: Any = None,
                 relog: Callable[[], Awaitable[int]] | None = None):
        self.nc = nc
        self.node = node
        self.replication = replication
        self.reader = TableStateReader(db_path, node.id, node.tables)
        self.db = DbThread(f"verify-{node.name}")
        self._applied = applied
        self.js = js  # None: this node cannot re-publish (repair)
        self._relog = relog  # None: this node cannot log its own rows again (gap closing)
        self._subscriptions: list[Any] = []

    async def start(self) -> None:
        prefix = self.replication.stream_prefix
        self._subscriptions = [
            await self.nc.subscribe(protocol.all_nodes_subject(prefix), cb=self._on_request),
            await self.nc.subscribe(protocol.node_subject(prefix, self.node.id), cb=self._on_request),
        ]
        log.info("verify service answering on %s.{all,node.%d}", protocol.subject_prefix(prefix), self.node.id)

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            try:
                await subscription.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - closing anyway
                log.debug("verify unsubscribe: %s", exc)
        self._subscriptions = []
        await self.db.run(self.reader.close)
        self.db.shutdown()

    async def _on_request(self, msg: Any) -> None:
        if not msg.reply:
            return
        try:
            body = self._with_applied(await self.answer(protocol.decode(msg.data)))
            reply = {"ok": True, "node": self.node.name, "id": self.node.id, **body}
        except (MarmotError, TableNotReplicated, ValueError, TypeError, KeyError) as exc:
            reply = {"ok": False, "node": self.node.name, "id": self.node.id, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a bad request must never stop the service
            log.warning("verify request failed: %s", exc, exc_info=exc)
            reply = {"ok": False, "node": self.node.name, "id": self.node.id, "error": f"{type(exc).__name__}: {exc}"}
        payload = protocol.encode(reply)
        if len(payload) > self.nc.max_payload:
            payload = protocol.encode({"ok": False, "node": self.node.name, "id": self.node.id,
                                       "error": f"answer too large ({len(payload)} bytes): ask for fewer keys"})
        try:
            await msg.respond(payload)
        except Exception as exc:  # noqa: BLE001 - the caller went away
            log.debug("verify reply not sent: %s", exc)

    def _with_applied(self, body: dict) -> dict:
        """Positions: the stored ones, raised to what the consumers hold in memory.

        A consumer skips the messages this process published itself (their rows are here
        already) and stores that position only now and then; in memory it is exact."""
        if "positions" in body and self._applied is not None:
            positions = dict(body["positions"])
            for stream, seq in self._applied().items():
                positions[stream] = max(int(seq), int(positions.get(stream, 0)))
            body["positions"] = positions
        return body

    async def answer(self, request: dict) -> dict:
        op = request.get("op")
        if op == protocol.OP_HELLO:
            tables = await self.db.run(self.reader.tables)
            return {
                "protocol": protocol.PROTOCOL_VERSION, "tables": tables, "replicate": bool(self.node.replicate),
                "publish": bool(self.node.publish),
                "streams": [self.replication.stream_name(shard) for shard in range(1, self.replication.shards + 1)],
            }
        if op == protocol.OP_PROGRESS:
            return await self.db.run(self.reader.progress)
        if op == protocol.OP_DIGEST:
            return await self.db.run(self.reader.bucket_digests, _text(request, "table"), _buckets(request))
        if op == protocol.OP_KEYS:
            wanted = [int(b) for b in request.get("bucket_ids") or []]
            scope = [int(b) for b in request.get("scope") or []] or None
            return await self.db.run(self.reader.keys_in_buckets, _text(request, "table"), _buckets(request), wanted,
                                     scope)
        if op == protocol.OP_LOOKUP:
            keys = request.get("keys")
            if not isinstance(keys, list) or not all(isinstance(key, list) for key in keys):
                raise protocol.VerifyProtocolError("lookup needs keys: a list of key value lists")
            return await self.db.run(self.reader.lookup, _text(request, "table"), keys, bool(request.get("rows")))
        if op == protocol.OP_REPUBLISH:
            return await self._republish(request)
        if op == protocol.OP_RELOG:
            # Committed to the change log before the answer: the asker may count on these rows
            # reaching every stream after the entries it read before asking (node/gap_closer.py).
            if not self.node.publish:
                return {"relogged": 0, "publish": False}
            if self._relog is None:
                raise protocol.VerifyProtocolError(f"node {self.node.name} cannot log its rows again")
            return {"relogged": await self._relog(), "publish": True}
        raise protocol.VerifyProtocolError(f"unknown verify op {op!r}")


    async def _republish(self, request: dict) -> dict:
        if self.js is None or not self.node.publish:
            raise protocol.VerifyProtocolError(f"node {self.node.name} does not publish: it cannot repair")
        table = _text(request, "table")
        keys, expected = request.get("keys"), request.get("expected")
        if not isinstance(keys, list) or not isinstance(expected, list) or len(keys) != len(expected):
            raise protocol.VerifyProtocolError("republish needs keys and expected (version, origin) pairs, one per key")
        found = await self.db.run(self.reader.lookup, table, keys, True)
        states = [KeyState.from_wire(item) for item in found["keys"]]
        shape = await self.db.run(self.reader.table_shape, table)
        fresh = request.get("fresh")
        fresh_as = None
        if isinstance(fresh, list) and any(fresh):
            clock = await self.db.run(self.reader.clock)
            fresh_as = (fresh_version(clock, int(request.get("floor") or 0)), self.node.id)
        rows, moved, missing = repair_rows(table, shape["columns"], shape["key"], states, expected,
                                           fresh if isinstance(fresh, list) else None, fresh_as)
        messages = await publish_repair(self.js, self.replication, self.node.id, self.nc.max_payload,
                                        shape["fingerprint"], table, shape["key"], rows)
        if rows:
            log.warning("repair: re-published %d row(s) of %s with their original versions (%d message(s))",
                        len(rows), table, messages)
        return {"published": len(rows), "moved_on": moved, "no_image": missing, "messages": messages}


def _text(request: dict, name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value:
        raise protocol.VerifyProtocolError(f"verify request needs {name!r}")
    return value


def _buckets(request: dict) -> int:
    value = request.get("buckets")
    if not isinstance(value, int) or not 1 <= value <= MAX_BUCKETS:
        raise protocol.VerifyProtocolError(f"buckets must be an integer 1..{MAX_BUCKETS}")
    return value
