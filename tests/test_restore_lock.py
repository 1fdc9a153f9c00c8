"""`snapshot restore` on a database whose node is running is refused (issue 10, case 18).

Real nats-servers, a real `marmot-appliance node` process, the real CLI. Before the fix the
restore replaced the file under the running node, whose consumers then kept applying into it
from their old positions. The lock is an flock the kernel drops when its holder dies, so a node
killed with SIGKILL leaves nothing that blocks the next restore.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.replication_cluster import SubprocessNode, node_command
from tests.snapshot_support import SCHEMA, fill, positions_of, user_digests

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marmot_appliance", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


async def test_restore_is_refused_while_the_node_runs_and_allowed_after_it_died(nats_cluster, wal_db, tmp_path):
    source = wal_db("n1.db", SCHEMA)
    target = wal_db("n2.db", SCHEMA)
    fill(source, 0, 500, positions={"marmot-changes-1": 3})
    fill(target, 10_000, 20)
    url = nats_cluster.url
    saved = cli("snapshot", "save", "--nats-url", url, "--db-path", str(source), "--node-id", "1")
    assert saved.returncode == 0, saved.stderr

    node = SubprocessNode(2, target, url, tmp_path / "n2.log", shards=1)
    node.start()
    try:
        await node.wait_healthy(90)
        before = user_digests(target)

        refused = cli("snapshot", "restore", "--nats-url", url, "--db-path", str(target), "--node-id", "2")
        assert refused.returncode == 1, (refused.stdout, refused.stderr)
        assert "in use by node node-2" in refused.stderr and "stop the node first" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert user_digests(target) == before  # nothing replaced

        # A second node on the same file is refused the same way (and exits at once).
        second = subprocess.run(node_command(2, target, url, shards=1), capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert "in use by node node-2" in second.stderr and "Traceback" not in second.stderr
        assert node.health()["status"] == "ok"
    finally:
        node.kill9()  # no clean shutdown: the lock must not outlive the process anyway

    restored = cli("snapshot", "restore", "--nats-url", url, "--db-path", str(target), "--node-id", "2")
    assert restored.returncode == 0, restored.stderr
    assert user_digests(target)["items"] == user_digests(source)["items"]
    assert positions_of(target)["marmot-changes-1"] == 3
