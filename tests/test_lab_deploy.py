"""Multi-host deployment on real systemd hosts: the lab + ansible/site.yml + the node runtime.

The session's lab (3 systemd-nspawn hosts in network namespaces, docs/deploy.md "The lab"; `vagrant_lab` in
tests/conftest.py) serves every test here, in file order: deploy, replicate both ways,
idempotence, a rolling spec change under a bounded writer, a partition and its healing, the
attacks of docs/security.md, status and destroy. tests/test_lab_schema.py then uses the same
hosts and ends with the teardown that must leave nothing behind.
Needs root and the lab packages; skips with the reason otherwise (fails under MARMOT_REQUIRE_LAB=1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "vagrant" / "cluster.yaml"
DB = "/var/lib/marmot-appliance/data/app.db"
HOST_PYTHON = "/opt/marmot-appliance/venv/bin/python"
PLAYBOOK_TIMEOUT_S = 1200
CONVERGE_TIMEOUT_S = 120

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(3600)]


def _missing_capability() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the lab needs root on Linux (network namespaces, mounts, systemd-nspawn)"
    for tool in ("ip", "systemd-nspawn", "debootstrap", "ssh", "ssh-keygen", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install systemd-container debootstrap openssh-client iproute2)"
    return None


@dataclass
class Lab:
    topology: object
    controller_state: Path
    wheelhouse: Path
    env: dict

    def playbook(self, spec: Path, *extra: str, timing: bool = False) -> tuple[subprocess.CompletedProcess, dict]:
        """ansible-playbook from the controller namespace; returns the result and the recap.
        With `timing`, the marmot_timing callback appends the run's slowest tasks to stdout."""
        command = [
            "ip", "netns", "exec", self.topology.controller_namespace,
            str(REPO / ".venv" / "bin" / "ansible-playbook"), "-i", str(spec), str(REPO / "ansible" / "site.yml"),
            "-e", f"marmot_controller_state_dir={self.controller_state}",
            "-e", f"marmot_packages_wheelhouse_dir={self.wheelhouse}",
            *extra,
        ]
        env = dict(self.env, ANSIBLE_CALLBACKS_ENABLED="marmot_timing") if timing else self.env
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=PLAYBOOK_TIMEOUT_S, cwd=REPO, check=False
        )
        assert result.returncode == 0, f"playbook failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
        return result, parse_recap(result.stdout)

    console: set = None  # hosts reached through their console (nsenter) instead of ssh

    def ssh(self, host: str, command: str, input_text: str | None = None, timeout_s: float = 120) -> str:
        from marmot_appliance.lab.containers import console_command
        from marmot_appliance.lab.ssh import ssh_command

        argv = console_command(self.topology, host, command) if host in (self.console or set()) else (
            ssh_command(self.topology, host, command)
        )
        result = subprocess.run(argv, input=input_text, capture_output=True, text=True, timeout=timeout_s, check=False)
        assert result.returncode == 0, f"{host}: {command} failed: {result.stderr or result.stdout}"
        return result.stdout

    def python(self, host: str, script: str, *args: str) -> str:
        """Run a Python script on a host (stdin), as root, with the appliance's venv."""
        quoted = " ".join(f"'{arg}'" for arg in args)
        return self.ssh(host, f"{HOST_PYTHON} - {quoted}", input_text=script)

    def execute(self, host: str, sql: str, params: list | None = None) -> None:
        script = (
            "import json, sqlite3, sys\n"
            f"c = sqlite3.connect({DB!r}, timeout=30)\n"
            "c.execute(sys.argv[1], json.loads(sys.argv[2]))\nc.commit()\n"
        )
        self.python(host, script, sql, json.dumps(params or []))

    def ids(self, host: str, table: str = "items") -> set[str]:
        script = (
            "import json, sqlite3\n"
            f"c = sqlite3.connect({DB!r}, timeout=30)\n"
            f"print(json.dumps([r[0] for r in c.execute('SELECT id FROM \"{table}\"')]))\n"
        )
        return set(json.loads(self.python(host, script)))

    def digest(self, host: str) -> dict:
        script = (
            "import json\nfrom marmot_appliance.replication.digest import table_digest\n"
            f"print(json.dumps(table_digest({DB!r}, ['items'])))\n"
        )
        return json.loads(self.python(host, script))

    def health(self, host: str) -> dict:
        script = (
            "import json, urllib.request, urllib.error\n"
            "try:\n    body = urllib.request.urlopen('http://127.0.0.1:9470/health', timeout=5).read()\n"
            "except urllib.error.HTTPError as e:\n    body = e.read()\nprint(body.decode())\n"
        )
        return json.loads(self.python(host, script))

    def wait_for_rows(self, hosts: list[str], expected: set[str], timeout_s: float = CONVERGE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        missing: dict[str, int] = {}
        while time.monotonic() < deadline:
            missing = {host: len(expected - self.ids(host)) for host in hosts}
            if not any(missing.values()):
                return
            time.sleep(1)
        health = {}
        for host in hosts:
            try:
                health[host] = self.health(host)
            except AssertionError as exc:  # unreachable host: say so instead
                health[host] = str(exc)
        raise AssertionError(
            f"rows missing after {timeout_s}s: {missing}; health: {health}\n{self.diagnostics(hosts)}"
        )

    def stream_leader(self, host: str, stream: str) -> str:
        """The lab host whose nats-server leads `stream`, as `host`'s server sees it."""
        script = (
            "import json, sys, urllib.request\n"
            "url = f'http://{sys.argv[2]}:8222/jsz?accounts=true&streams=true'\n"
            "jsz = json.load(urllib.request.urlopen(url, timeout=5))\n"
            "leaders = [s.get('cluster', {}).get('leader') for a in jsz.get('account_details', [])\n"
            "           for s in a.get('stream_detail', []) if s['name'] == sys.argv[1]]\n"
            "print(json.dumps(leaders))\n"
        )
        # The monitor listens on loopback only (nats.monitor_address): ask it on the host itself.
        leaders = json.loads(self.python(host, script, stream, "127.0.0.1"))
        assert len(leaders) == 1 and leaders[0], f"no leader for {stream} seen from {host}: {leaders}"
        server_prefix = f"{yaml.safe_load(SPEC.read_text())['name']}-"  # server_name is <cluster>-<node>
        assert leaders[0].startswith(server_prefix), leaders
        return leaders[0][len(server_prefix):]

    def diagnostics(self, hosts: list[str]) -> str:
        """The last journal lines of both services and the JetStream view of each host."""
        jsz = (
            "import sys, urllib.request\n"
            "url = f'http://{sys.argv[1]}:8222/jsz?accounts=true&streams=true&consumers=true&raft=true'\n"
            "print(urllib.request.urlopen(url, timeout=5).read().decode())\n"
        )
        parts = []
        for host in hosts:
            try:
                journal = self.ssh(host, "journalctl -u marmot-node -u nats-server --no-pager -n 80 -o short-precise")
                parts.append(f"--- {host}: journal\n{journal[-8000:]}")
                parts.append(f"--- {host}: jsz\n{self.python(host, jsz, '127.0.0.1')[-6000:]}")
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                parts.append(f"--- {host}: diagnostics failed: {exc}")
        return "\n".join(parts)


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap = {}
    for match in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", output, re.M):
        recap[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
    return recap


def lab_for(spec: Path, tmp_path_factory, extra_requirements: list[str] | None = None):
    """A lab built from `spec` for a test module (generator: yields a Lab, then tears it down)."""
    reason = _missing_capability()
    if reason:
        skip_or_fail(reason)
    from marmot_appliance.deploy.wheelhouse import build_wheelhouse
    from marmot_appliance.lab.lifecycle import is_up, lab_down, lab_up
    from marmot_appliance.lab.ssh import ansible_environment
    from marmot_appliance.lab.topology import topology_for
    from marmot_appliance.spec.loader import load_cluster

    topology = topology_for(load_cluster(spec))
    if is_up(topology):
        lab_down(topology)  # left over by an interrupted run: start clean
    # The dependency wheels are fetched here, in the root namespace (package index reachable);
    # inside the controller namespace the role only rebuilds the project wheel, offline.
    # Per checkout (gitignored): the lab's state location is shared by every checkout on the
    # machine, and two checkouts' tests must not swap each other's project wheel.
    wheelhouse = REPO / ".lab-cache" / "wheelhouse"
    build_wheelhouse(wheelhouse, extra_requirements=extra_requirements)
    env = dict(os.environ)
    env.update(ansible_environment(topology))
    env.update({"ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1"})
    lab_up(topology, progress=lambda _m: None)
    try:
        yield Lab(topology, tmp_path_factory.mktemp("controller-state"), wheelhouse, env)
    finally:
        lab_down(topology, progress=lambda _m: None)


@pytest.fixture(scope="module")
def lab(vagrant_lab):
    """The session's lab (tests/conftest.py): tests/test_lab_schema.py deploys on the same hosts
    after this module, and its last test takes the lab down and checks nothing is left."""
    return vagrant_lab


def test_site_yml_deploys_services_and_replicates_both_ways(lab):
    result, recap = lab.playbook(SPEC)
    assert set(recap) == {"node1", "node2", "node3"}
    assert all(counts["failed"] == 0 and counts["unreachable"] == 0 for counts in recap.values())
    for host in ("node1", "node2", "node3"):
        states = lab.ssh(host, "systemctl is-active nats-server marmot-node").split()
        assert states == ["active", "active"], f"{host}: {states}"
        assert lab.health(host)["status"] == "ok"
        # Secrets and config are not world-readable.
        modes = lab.ssh(host, "stat -c '%a %U' /etc/nats-server/nats-server.conf "
                              "/var/lib/marmot-appliance/node/secrets/nats-credentials.json").split("\n")
        assert modes[0].split()[0] == "640" and modes[1].split() == ["600", "marmot"]
        # The monitor (plain HTTP, lists every connection) answers on loopback, not on the network.
        probe = ("import socket, sys\n"
                 "for address in sys.argv[1:]:\n"
                 "    try:\n"
                 "        socket.create_connection((address, 8222), timeout=5).close(); print(address, 'open')\n"
                 "    except OSError:\n"
                 "        print(address, 'refused')\n")
        reach = lab.python(host, probe, "127.0.0.1", lab.topology.host(host).address).strip().split("\n")
        assert reach == ["127.0.0.1 open", f"{lab.topology.host(host).address} refused"], reach
        # A node host holds its own identity only; never another node's, the reader's or the route secret.
        held = json.loads(lab.ssh(host, "cat /var/lib/marmot-appliance/node/secrets/nats-credentials.json"))
        assert list(held) == ["nodes"] and list(held["nodes"]) == [host]
        lab.execute(host, 'CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, origin TEXT, n INTEGER)')
    lab.execute("node1", "INSERT INTO items VALUES (?, ?, ?)", ["from-node1", "node1", 1])
    lab.wait_for_rows(["node2", "node3"], {"from-node1"})
    lab.execute("node3", "INSERT INTO items VALUES (?, ?, ?)", ["from-node3", "node3", 3])
    lab.wait_for_rows(["node1", "node2"], {"from-node3"})


def test_second_run_changes_nothing(lab):
    # The wheelhouse is packed as it is (no rebuild), so concurrent source edits cannot leak in.
    result, recap = lab.playbook(SPEC, "-e", "marmot_packages_build_wheelhouse=false", timing=True)
    assert {host: counts["changed"] for host, counts in recap.items()} == {"node1": 0, "node2": 0, "node3": 0}
    print(result.stdout[result.stdout.index("marmot_timing:"):])  # where a no-op run's time goes (pytest -s)


def _changed_spec(directory: Path) -> Path:
    spec = yaml.safe_load(SPEC.read_text())
    spec["replication"]["batch"]["max_delay_ms"] = 5  # lands in every node's cluster.yaml
    path = directory / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_remote_plan_shows_nothing_then_the_pending_spec_change(lab, tmp_path):
    """`plan` for remote hosts: a check-mode run parsed by the marmot_plan callback."""
    script = (
        "import sys\nfrom marmot_appliance.deploy.remote import plan_remote\n"
        "from marmot_appliance.spec.loader import load_cluster\n"
        "c = load_cluster(sys.argv[1])\n"
        "sys.exit(plan_remote(c, c.source, extra_args=sys.argv[2:], detailed_exitcode=True))\n"
    )
    extra = ["-e", f"marmot_controller_state_dir={lab.controller_state}",
             "-e", f"marmot_packages_wheelhouse_dir={lab.wheelhouse}", "-e", "marmot_packages_build_wheelhouse=false"]

    def plan(spec: Path, expected_exit: int) -> str:
        result = subprocess.run(
            ["ip", "netns", "exec", lab.topology.controller_namespace, sys.executable, "-c", script, str(spec), *extra],
            capture_output=True, text=True, env=lab.env, timeout=PLAYBOOK_TIMEOUT_S, cwd=REPO, check=False,
        )
        assert result.returncode == expected_exit, result.stdout + result.stderr  # --detailed-exitcode
        return result.stdout

    assert "No changes." in plan(SPEC, 0)
    pending = plan(_changed_spec(tmp_path), 2)
    for host in ("node1", "node2", "node3"):
        assert f"~ host {host}" in pending
    assert "marmot_node: Write the cluster spec" in pending
    assert "nats_server: Write nats-server.conf" not in pending  # the change is node-only
    # Planning changed nothing on the hosts.
    assert "max_delay_ms: 2" in lab.ssh("node1", "cat /etc/marmot-appliance/cluster.yaml")


WRITER = r"""
import os, sqlite3, sys, time
db, prefix, stop_file = sys.argv[1], sys.argv[2], sys.argv[3]
max_rows, max_seconds = 5000, 600  # bounded in count and time whatever happens
conn = sqlite3.connect(db, timeout=30)
start, written = time.monotonic(), 0
while written < max_rows and time.monotonic() - start < max_seconds and not os.path.exists(stop_file):
    with conn:
        conn.execute("INSERT INTO items VALUES (?, ?, ?)", (f"{prefix}-{written}", prefix, written))
    written += 1
    time.sleep(0.05)
print(written)
"""


def test_spec_change_rolls_one_node_at_a_time_while_writes_continue(lab, tmp_path):
    changed_spec = _changed_spec(tmp_path)
    stop_file = "/tmp/marmot-lab-writer.stop"
    lab.ssh("node1", f"rm -f {stop_file}")
    from marmot_appliance.lab.ssh import ssh_command

    lab.ssh("node1", "cat > /tmp/marmot-lab-writer.py", input_text=WRITER)
    writer = subprocess.Popen(
        ssh_command(lab.topology, "node1", f"{HOST_PYTHON} /tmp/marmot-lab-writer.py {DB} rolling {stop_file}"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        result, recap = lab.playbook(changed_spec, "-e", "marmot_packages_build_wheelhouse=false")
    finally:
        lab.ssh("node1", f"touch {stop_file}")
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, f"writer failed: {err}"
    written = int(out.strip())
    assert written > 0
    # Every node restarted, strictly one after the other, each healthy before the next began.
    rolling = result.stdout[result.stdout.index("PLAY [Rolling restart"):]
    events = re.findall(
        r"TASK \[marmot_service : (Restart under systemd marmot-node|Wait until healthy marmot-node)\].*?\n"
        r"(?:.*\n)*?(?:changed|ok): \[(node\d)\]",
        rolling,
    )
    restart_order = [(task.split()[0], host) for task, host in events]
    assert restart_order == [
        ("Restart", "node1"), ("Wait", "node1"),
        ("Restart", "node2"), ("Wait", "node2"),
        ("Restart", "node3"), ("Wait", "node3"),
    ], restart_order
    expected = {f"rolling-{i}" for i in range(written)}
    lab.wait_for_rows(["node1", "node2", "node3"], expected)


def test_partitioned_stream_leader_catches_up_and_all_converge(lab):
    """Cut off the host whose nats-server leads the shard stream: the hardest partition (a new
    leader must be elected while both remaining nodes keep publishing single-row commits)."""
    from marmot_appliance.lab.network import set_link

    cut = lab.stream_leader("node1", "marmot-changes-1")
    writers = [host for host in ("node1", "node2", "node3") if host != cut]
    set_link(lab.topology, cut, up=False)
    lab.console = {cut}  # ssh cannot reach a host that is cut off
    try:
        for i in range(30):
            for host in writers:
                lab.execute(host, "INSERT INTO items VALUES (?, ?, ?)", [f"cut-{host}-{i}", host, i])
        lab.execute(cut, "INSERT INTO items VALUES (?, ?, ?)", [f"cut-{cut}-0", cut, 0])
        during = {f"cut-{host}-{i}" for host in writers for i in range(30)}
        lab.wait_for_rows(writers, during)
        assert not (lab.ids(cut) & during), f"{cut} saw writes while it was cut off"
    finally:
        set_link(lab.topology, cut, up=True)
        lab.console = set()
    everything = during | {f"cut-{cut}-0"}
    lab.wait_for_rows(["node1", "node2", "node3"], everything, timeout_s=240)
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    while True:
        digests = [lab.digest(host) for host in ("node1", "node2", "node3")]
        if digests[0] == digests[1] == digests[2] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert digests[0] == digests[1] == digests[2], digests


def test_a_seeded_chaos_run_with_partitions_converges(lab):
    """One short run of the lab chaos harness (tests/lab_chaos.py; bench/chaos_lab.py runs many):
    writers on every host while a host is cut off, the node service is killed and paused; then
    digests equal, `verify` converged, every acknowledged write kept and no deleted key back."""
    from tests.lab_chaos import HOSTS, prepare_items_table, run_lab_chaos

    # Runnable alone (`-k chaos`): without this module's first test nothing is deployed yet, and
    # every fault would find no node service (what `-k chaos` did before).
    if any(lab.ssh(host, "systemctl is-active marmot-node || true").strip() != "active" for host in HOSTS):
        lab.playbook(SPEC)
        prepare_items_table(lab)
    result = run_lab_chaos(lab, SPEC, seed=6, duration_s=35, say=lambda _line: None)
    assert result.ok, "\n".join([*result.faults, *result.problems])
    assert any(" partition " in fault for fault in result.faults), result.faults
    assert result.operations > 100, result.operations


def _cli(lab, *args: str) -> subprocess.CompletedProcess:
    """marmot-appliance from the controller namespace (ssh reaches the lab hosts from there)."""
    return subprocess.run(
        ["ip", "netns", "exec", lab.topology.controller_namespace, sys.executable, "-m", "marmot_appliance", *args],
        capture_output=True, text=True, env=lab.env, timeout=PLAYBOOK_TIMEOUT_S, cwd=REPO, check=False,
    )


def test_remote_status_shows_every_node(lab):
    result = _cli(lab, "status", str(SPEC))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:] if line.strip()}
    assert lines == {"node1": "healthy", "node2": "healthy", "node3": "healthy"}, result.stdout
    as_json = json.loads(_cli(lab, "status", str(SPEC), "--output", "json").stdout)
    assert [(n["node"], n["healthy"], n["health"]["node"]) for n in as_json] == [
        ("node1", True, "node1"), ("node2", True, "node2"), ("node3", True, "node3")]


def test_deployed_cluster_refuses_a_stray_route_server_an_anonymous_client_and_forged_origins(lab, tmp_path):
    """The quick start's attacks (tests/test_security_cluster.py), on the cluster site.yml
    deployed, from the controller namespace (tests/lab_attacks.py). Late in the module: the
    garbage and forged messages it publishes are dead-lettered, and /health then says so."""
    from tests.test_security_cluster import CONTROL_IDS, FORGED_IDS

    result = subprocess.run(
        ["ip", "netns", "exec", lab.topology.controller_namespace, sys.executable, "-m", "tests.lab_attacks",
         str(SPEC), str(lab.controller_state), str(tmp_path), "--host-python", HOST_PYTHON],
        capture_output=True, text=True, env=dict(lab.env, PYTHONPATH=str(REPO)), timeout=600, cwd=REPO, check=False,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    refusals = json.loads(result.stdout.strip().splitlines()[-1])["refusals"]
    assert set(refusals) == {"n1 on n2's token", "reader on n3's token"}, refusals
    for attempt, reason in refusals.items():
        assert "permissions violation" in reason.lower(), f"{attempt}: {reason}"
    # node1's last control message reaches the others, so every message before it was handled
    # too (one stream, one order); nothing forged is in any database.
    lab.wait_for_rows(["node2", "node3"], CONTROL_IDS)
    for host in ("node1", "node2", "node3"):
        assert not (lab.ids(host) & FORGED_IDS), f"{host} applied a forged message"
    for host in ("node2", "node3"):
        assert lab.health(host)["dead_letters"] >= 1


def test_remote_destroy_stops_services_purges_state_and_keeps_databases(lab):
    rows_before = lab.ids("node2")
    lab.ssh("node2", "systemctl stop marmot-node")  # one node already down: destroy still works
    down = _cli(lab, "status", str(SPEC))
    assert down.returncode == 1 and re.search(r"^node2\s+down\b", down.stdout, re.M), down.stdout

    result = _cli(lab, "destroy", str(SPEC), "--purge")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Databases are never removed" in result.stdout
    from marmot_appliance.lab.ssh import ssh_command

    probe = ("systemctl is-active nats-server marmot-node; systemctl is-enabled marmot-node; "
             "test -e /var/lib/marmot-appliance/nats && echo store-left || echo store-gone; "
             "test -e /var/lib/marmot-appliance/node && echo state-left || echo state-gone")
    for host in ("node1", "node2", "node3"):
        # `systemctl is-active` exits non-zero for inactive units: read stdout, not the exit code.
        states = subprocess.run(ssh_command(lab.topology, host, probe), capture_output=True, text=True,
                                timeout=60, check=False).stdout.split()
        assert states == ["inactive", "inactive", "disabled", "store-gone", "state-gone"], f"{host}: {states}"
    assert lab.ids("node2") == rows_before  # the application's database is untouched
    assert "from-node1" in rows_before
