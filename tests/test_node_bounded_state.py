"""`publish: false` and `replicate: false` nodes keep no state that grows forever (issue 10, case 12).

Real nats-server, real node runtimes (in-process), real SQLite files.
"""

from __future__ import annotations

from dataclasses import replace

from marmot_appliance.node.runtime import NodeRuntime
from tests.harness import settled
from tests.replication_cluster import InProcessNode, execute, log_rows, table_rows, wait_until

SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY, v)"


class FlaggedNode(InProcessNode):
    """An InProcessNode whose spec entry says publish / replicate false."""

    def __init__(self, *args, publish: bool = True, replicate: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.publish = publish
        self.replicate = replicate

    def config(self):
        config = super().config()
        node = replace(config.node, publish=self.publish, replicate=self.replicate)
        return replace(config, node=node, cluster=replace(config.cluster, nodes=(node,)))

    async def start(self):
        import asyncio

        self.stop_event = asyncio.Event()
        self.runtime = NodeRuntime(self.config())
        self.task = asyncio.create_task(self.runtime.run(self.stop_event), name=f"node-{self.node_id}")
        await wait_until(lambda: self.runtime.status.started or self.task.done(), 60, 0.05, "node start")
        if self.task.done():
            self.task.result()
        return self


async def test_publish_false_does_not_grow_the_change_log(nats_server, wal_db):
    """Before: every local write stayed in _marmot_log_kv forever (nobody publishes it)."""
    source = wal_db("quiet.db", SCHEMA)
    sink = wal_db("sink.db", SCHEMA)
    quiet = await FlaggedNode(1, source, nats_server.url, shards=1, replicas=1, publish=False).start()
    other = await InProcessNode(2, sink, nats_server.url, shards=1, replicas=1).start()
    try:
        for round_ in range(3):
            execute(source, "INSERT INTO kv VALUES (?, ?)", [(f"r{round_}-{i}", i) for i in range(200)], many=True)
            await wait_until(lambda: log_rows(source, "kv") == 0, 30, 0.2, "the unpublished log to be emptied")
        execute(sink, "INSERT INTO kv VALUES ('from-2', 1)")  # still applies what others write
        await wait_until(lambda: ("from-2", 1) in table_rows(source, "kv"), what="node 2's row on the quiet node")
        assert table_rows(sink, "kv") == [("from-2", 1)]  # and published nothing
        assert quiet.runtime.status.pending_rows == 0
    finally:
        await quiet.stop()
        await other.stop()


async def test_replicate_false_forgets_acknowledged_sequences(nats_server, wal_db):
    """Before: every sequence the publisher got acknowledged was kept for a consumer that a
    replicate: false node never runs, so memory grew with every batch published."""
    db = wal_db("writer.db", SCHEMA)
    writer = await FlaggedNode(1, db, nats_server.url, shards=1, replicas=1, replicate=False).start()
    try:
        for i in range(20):
            execute(db, "INSERT INTO kv VALUES (?, ?)", (f"k{i}", i))
            await wait_until(lambda: log_rows(db, "kv") == 0, 30, 0.05, "the row to be published")
        published = (await settled(lambda: writer.runtime.js.stream_info(writer.runtime.replication.stream_name(1)))).state.messages
        assert published >= 2
        remembered = sum(len(seqs) for seqs in writer.runtime.own_publishes._seqs.values())
        assert remembered == 0, f"{remembered} acknowledged sequences kept by a node that never consumes"
    finally:
        await writer.stop()
