"""The node's /health and /metrics endpoints: a minimal asyncio HTTP/1.1 server, no dependencies.

GET /health  -> JSON from the health callable; 200 when status is "ok", 503 otherwise.
GET /metrics -> the Metrics registry in the Prometheus text format (version 0.0.4).
Anything else -> 404; methods other than GET/HEAD -> 405. One request per connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

from marmot_appliance.observability.metrics import Metrics

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 16384
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class ObservabilityServer:
    def __init__(
        self,
        host: str,
        port: int,
        health: Callable[[], dict],
        metrics: Metrics,
        before_metrics: Callable[[], None] | None = None,
    ):
        self.host = host
        self.port = port
        self._health = health
        self._metrics = metrics
        self._before_metrics = before_metrics
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        sockets = self._server.sockets or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]  # port 0 picks a free port (tests)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        try:
            status, content_type, body, method = self._route(head[:MAX_REQUEST_BYTES])
        except Exception:  # noqa: BLE001 - a bug in a status callable must not kill the server
            log.exception("error serving an HTTP request")
            status, content_type, body, method = 503, "text/plain", b"internal error\n", "GET"
        headers = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(headers + (b"" if method == "HEAD" else body))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, head: bytes) -> tuple[int, str, bytes, str]:
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _version = request_line.split(" ", 2)
        except ValueError:
            return 400, "text/plain", b"bad request\n", "GET"
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n", method
        if path == "/health":
            health = self._health()
            code = 200 if health.get("status") == "ok" else 503
            return code, "application/json", (json.dumps(health, sort_keys=True) + "\n").encode(), method
        if path == "/metrics":
            if self._before_metrics is not None:
                self._before_metrics()
            return 200, PROMETHEUS_CONTENT_TYPE, self._metrics.render().encode(), method
        return 404, "text/plain", b"not found\n", method
