"""The /health and /metrics server on a real socket."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from marmot_appliance.node.status import RuntimeStatus
from marmot_appliance.observability.http import ObservabilityServer
from marmot_appliance.observability.metrics import Metrics


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


async def test_health_status_codes_and_metrics_parse():
    status = RuntimeStatus(node="n1", db_path="/tmp/x.db", nats_connected=True, capture_installed=True, started=True)
    status.lag["marmot-changes-1"] = 3
    metrics = Metrics()
    metrics.inc("rows_published", 5)
    metrics.set("stream_lag", 3, stream="marmot-changes-1")
    server = ObservabilityServer("127.0.0.1", 0, status.as_health, metrics)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        code, ctype, body = await asyncio.to_thread(_get, base + "/health")
        assert code == 200 and ctype == "application/json"
        health = json.loads(body)
        assert health["status"] == "ok" and health["node"] == "n1"
        assert health["lag"] == {"marmot-changes-1": 3}
        assert set(health) >= {"database", "nats", "capture", "last_publish", "last_apply", "dead_letters", "last_snapshot"}

        status.nats_connected = False
        code, _, body = await asyncio.to_thread(_get, base + "/health")
        assert code == 503 and json.loads(body)["status"] == "unhealthy"

        status.nats_connected, status.capture_installed = True, False  # still starting up
        code, _, body = await asyncio.to_thread(_get, base + "/health")
        assert code == 503 and json.loads(body)["capture"]["installed"] is False
        status.capture_installed = True

        status.started = False  # start-up flush / snapshot check still running
        code, _, body = await asyncio.to_thread(_get, base + "/health")
        assert code == 503 and json.loads(body)["started"] is False
        status.started = True

        code, ctype, body = await asyncio.to_thread(_get, base + "/metrics")
        assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert families["marmot_rows_published"].samples[0].value == 5
        lag = families["marmot_stream_lag"].samples[0]
        assert lag.labels == {"stream": "marmot-changes-1"} and lag.value == 3

        code, _, _ = await asyncio.to_thread(_get, base + "/nope")
        assert code == 404
    finally:
        await server.close()


async def test_garbage_request_does_not_kill_the_server():
    server = ObservabilityServer("127.0.0.1", 0, lambda: {"status": "ok"}, Metrics())
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\x00\x01garbage\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 400")
        writer.close()
        code, _, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/health")
        assert code == 200
    finally:
        await server.close()
