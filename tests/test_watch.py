"""`marmot-appliance watch` as users run it: the real console script against a real cluster."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import nats
import pytest

from tests.test_feed import (
    STORAGE_CLASS_VALUES,
    batch_of,
    create_shard_streams,
    delete,
    publish,
    up,
    wait_for_consumers,
)

WATCH = [str(Path(sys.executable).parent / "marmot-appliance"), "watch"]
WAIT_S = 60.0


class WatchProcess:
    """A running `watch`, its stdout read line by line on a thread (reads never block a test)."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [*WATCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8"
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def records(self, count: int) -> list[dict]:
        got = []
        for _ in range(count):
            try:
                line = self.lines.get(timeout=WAIT_S)
            except queue.Empty:
                self.stop()
                raise AssertionError(f"watch printed {len(got)} of {count} lines; stderr: {self.stderr}")
            if line is None:
                raise AssertionError(f"watch ended after {len(got)} lines; stderr: {self.proc.stderr.read()}")
            got.append(json.loads(line))
        return got

    def stop(self, signum: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self.stderr = self.proc.stderr.read()
        return code


@pytest.fixture
async def js(nats_cluster):
    nc = await nats.connect(nats_cluster.urls, connect_timeout=10)
    try:
        yield nc.jetstream(timeout=30)
    finally:
        await nc.close()


async def test_watch_prints_json_lines_in_stream_order_and_exits_0_on_ctrl_c(nats_cluster, js):
    await create_shard_streams(js, 1)
    await publish(js, batch_of(1, up("t", 1, 10, v="a"), delete("t", 1, 11)))
    await publish(js, batch_of(2, up("kinds", 7, 12, origin=2, **dict(STORAGE_CLASS_VALUES))))
    watch = WatchProcess("--nats-url", nats_cluster.url, "--from", "start")
    first, second, kinds = watch.records(3)
    assert watch.stop(signal.SIGINT) == 0
    assert "Traceback" not in watch.stderr

    assert first == {**first, "table": "t", "op": "upsert", "pk": [1], "values": {"id": 1, "v": "a"}}
    assert (first["version"], first["origin"], first["stream"], first["seq"]) == (10, 1, "marmot-changes-1", 1)
    assert first["time"].endswith("Z")
    assert (second["op"], second["values"], second["seq"]) == ("delete", {"id": 1}, 1)
    assert (kinds["table"], kinds["origin"], kinds["seq"], kinds["pk"]) == ("kinds", 2, 2, [7])
    values = kinds["values"]
    assert values["i_max"] == 2**63 - 1 and values["i_min"] == -(2**63)
    assert values["r_tenth"] == 0.1
    assert values["r_negzero"] == 0.0 and math.copysign(1, values["r_negzero"]) == -1
    assert values["r_inf"] == {"$float": "inf"}
    assert values["r_nan"] == {"$float": "nan"}
    assert values["t_big"] == dict(STORAGE_CLASS_VALUES)["t_big"]
    assert values["b_blob"] == {"$base64": "AP9iaW5hcnkA"}
    assert values["n_null"] is None


async def test_watch_from_now_follows_new_changes_and_stops_on_sigterm(nats_cluster, js):
    await create_shard_streams(js, 2)
    await publish(js, batch_of(1, up("t", 1, 1, v="history")), shard=1)
    watch = WatchProcess("--nats-url", nats_cluster.url, "--shards", "2")
    await wait_for_consumers(js, "marmot-changes-1", process=watch.proc)
    await wait_for_consumers(js, "marmot-changes-2", process=watch.proc)
    await publish(js, batch_of(1, up("t", 2, 2, v="new on 2")), shard=2)
    await publish(js, batch_of(1, up("t", 3, 3, v="new on 1")), shard=1)
    records = watch.records(2)
    assert watch.stop(signal.SIGTERM) == 0
    assert sorted((r["stream"], r["seq"], r["values"]["v"]) for r in records) == [
        ("marmot-changes-1", 2, "new on 1"),
        ("marmot-changes-2", 1, "new on 2"),
    ]


async def test_watch_table_and_op_filters(nats_cluster, js):
    await create_shard_streams(js, 1)
    await publish(
        js,
        batch_of(1, up("a", 1, 1, v="x"), up("b", 1, 2, v="y"), delete("a", 1, 3), up("c", 1, 4, v="z")),
    )
    await publish(js, batch_of(1, delete("c", 1, 5)))  # the last line each filter should reach
    by_table = WatchProcess("--nats-url", nats_cluster.url, "--from", "start", "--table", "a", "--table", "c")
    lines = by_table.records(4)
    assert by_table.stop() == 0
    assert [(r["table"], r["op"]) for r in lines] == [("a", "upsert"), ("a", "delete"), ("c", "upsert"), ("c", "delete")]

    by_op = WatchProcess("--nats-url", nats_cluster.url, "--from", "start", "--op", "delete", "--table", "c")
    (only,) = by_op.records(1)
    assert by_op.stop() == 0
    assert (only["table"], only["op"], only["seq"]) == ("c", "delete", 2)


def run_into_head(url: str, lines: int) -> subprocess.CompletedProcess:
    """`watch | head`, with watch's own exit status reported (pipefail + PIPESTATUS)."""
    script = (
        "set -o pipefail; "
        f"{WATCH[0]} watch --nats-url {url} --from start | head -n {lines}; "
        'echo "watch-status=${PIPESTATUS[0]}" >&2'
    )
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=WAIT_S * 2)


async def test_piped_into_head_exits_0_while_writing(nats_cluster, js):
    """More output than a pipe buffer holds: watch meets a closed pipe on write."""
    await create_shard_streams(js, 1)
    for start in range(0, 2000, 500):
        await publish(js, batch_of(1, *(up("t", k, k, v="x" * 100) for k in range(start, start + 500))))
    result = run_into_head(nats_cluster.url, 5)
    assert result.returncode == 0, result.stderr
    assert "watch-status=0" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert [json.loads(line)["pk"] for line in result.stdout.splitlines()] == [[0], [1], [2], [3], [4]]


async def test_piped_into_head_exits_0_while_idle(nats_cluster, js):
    """Fewer changes than the pipe holds: watch notices the closed pipe without another write."""
    await create_shard_streams(js, 1)
    await publish(js, batch_of(1, *(up("t", k, k, v="x") for k in range(8))))
    result = run_into_head(nats_cluster.url, 5)
    assert result.returncode == 0, result.stderr
    assert "watch-status=0" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stdout.splitlines()) == 5


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one of --spec FILE or --nats-url"),
        (["--nats-url", "nats://127.0.0.1:1", "--spec", "x.yaml"], "exactly one of"),
        (["--nats-url", "nats://127.0.0.1:1", "--shards", "0"], "must be >= 1"),
        (["--nats-url", "nats://127.0.0.1:1", "--shards", "two"], "expected an integer"),
        (["--nats-url", "nats://127.0.0.1:1", "--from", "yesterday"], "cannot start from"),
        (["--nats-url", "nats://127.0.0.1:1", "--from", "0"], ">= 1"),
        (["--nats-url", "nats://127.0.0.1:1", "--op", "merge"], "invalid choice"),
        (["--nats-url", "nats://127.0.0.1:1", "--node", "n1"], "only apply with --spec"),
        (["--spec", "/nonexistent/cluster.yaml"], "no such file"),
        (["--nats-url", "nats://127.0.0.1:{dead}"], "cannot connect to NATS"),
    ],
)
def test_bad_arguments_exit_1_with_a_message(args, message):
    args = [a.replace("{dead}", str(_dead_port())) for a in args]
    result = subprocess.run([*WATCH, *args], capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 1, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


async def test_missing_stream_exits_1(nats_cluster, js):
    await create_shard_streams(js, 1)
    result = subprocess.run(
        [*WATCH, "--nats-url", nats_cluster.url, "--shards", "3"], capture_output=True, text=True, timeout=WAIT_S
    )
    assert result.returncode == 1
    assert "marmot-changes-2 does not exist" in result.stderr
    assert "Traceback" not in result.stderr


async def test_watch_from_a_cluster_spec(nats_cluster, js, tmp_path):
    """--spec: servers, prefixes and shard count come from the spec."""
    urls = "".join(f"\n    - {url}" for url in nats_cluster.urls)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(
        f"""apiVersion: marmot-appliance/v1
kind: Cluster
name: feedtest
replication:
  shards: 2
  stream_prefix: shop-changes
  subject_prefix: shop-log
nats:
  embedded: false
  auth: {{mode: none}}
  urls:{urls}
nodes:
  - {{name: n1, id: 1, host: 127.0.0.1, db: n1.db}}
"""
    )
    check = subprocess.run(
        [WATCH[0], "validate", str(spec)], capture_output=True, text=True, timeout=WAIT_S
    )
    assert check.returncode == 0, check.stderr
    await create_shard_streams(js, 2, stream_prefix="shop-changes", subject_prefix="shop-log")
    await publish(js, batch_of(1, up("t", 1, 1, v="via spec")), shard=2, subject_prefix="shop-log")
    watch = WatchProcess("--spec", str(spec), "--node", "n1", "--from", "start")
    (record,) = watch.records(1)
    assert watch.stop() == 0
    assert (record["stream"], record["values"]) == ("shop-changes-2", {"id": 1, "v": "via spec"})

    unknown = subprocess.run(
        [*WATCH, "--spec", str(spec), "--node", "n9"], capture_output=True, text=True, timeout=WAIT_S
    )
    assert unknown.returncode == 1 and "no node named 'n9'" in unknown.stderr


def test_watch_help_documents_markers():
    result = subprocess.run([*WATCH, "--help"], capture_output=True, text=True, timeout=WAIT_S, env=os.environ)
    assert result.returncode == 0
    assert "$base64" in result.stdout and "$float" in result.stdout
