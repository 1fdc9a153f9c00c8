"""The documented lab sequence, as a new user runs it: a plain `pip install .`, then the
commands docs/deploy.md prints, verbatim, in their order (read from the page).

`lab up` -> `apply` -> a row written on node1 read on node2 -> `status` -> a second `apply`
with no changes -> `destroy` -> `lab down`. The spec is vagrant/cluster.yaml under another
cluster name (its own lab, so it never meets the lab of tests/test_lab_deploy.py); the commands
run from a directory holding it as `vagrant/cluster.yaml`, exactly as the page spells them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import skip_or_fail
from tests.lab_sequence import kind, lab_sequence
from tests.test_lab_deploy import _missing_capability

REPO = Path(__file__).resolve().parents[1]
LAB_NAME = "newuser"
COMMAND_TIMEOUT_S = 900
ROW_TIMEOUT_S = 120

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(2400)]


def _plain_install(directory: Path) -> Path:
    """`python3 -m venv .venv && .venv/bin/pip install .`, the README's install, not editable."""
    venv = directory / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(REPO)],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return venv / "bin"


def test_documented_lab_sequence_from_a_plain_install(tmp_path):
    reason = _missing_capability()
    if reason:
        skip_or_fail(reason)
    install_started = time.monotonic()
    bin_dir = _plain_install(tmp_path)
    install_s = time.monotonic() - install_started
    workdir = tmp_path / "checkout"
    (workdir / "vagrant").mkdir(parents=True)
    spec = yaml.safe_load((REPO / "vagrant" / "cluster.yaml").read_text())
    spec["name"] = LAB_NAME
    (workdir / "vagrant" / "cluster.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"

    timings: list[tuple[str, float]] = []  # printed at the end (pytest -s): where the minutes go

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        assert argv[0] == "marmot-appliance", argv
        started = time.monotonic()
        result = subprocess.run([str(bin_dir / "marmot-appliance"), *argv[1:]], cwd=workdir, env=env,
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
        timings.append((kind(argv), time.monotonic() - started))
        return result

    commands = lab_sequence()
    applies = 0
    try:
        for argv in commands:
            what = kind(argv)
            if what == "lab exec" and "SELECT" in argv[-1]:
                # The row written on node1 arrives on node2 (bounded wait).
                deadline = time.monotonic() + ROW_TIMEOUT_S
                while True:
                    result = run(argv)
                    if "written on node1" in result.stdout or time.monotonic() > deadline:
                        break
                    time.sleep(1)
                assert "written on node1" in result.stdout, result.stdout + result.stderr
                continue
            result = run(argv)
            output = result.stdout + result.stderr
            assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{output[-6000:]}"
            if what == "apply":
                applies += 1
                if applies == 1:
                    assert "Apply complete." in result.stdout, output[-3000:]
                else:
                    assert "No changes. The hosts match the spec." in result.stdout, output[-3000:]
            elif what == "status":
                states = dict(re.findall(r"^(node\d)\s+(\S+)", result.stdout, re.M))
                assert states == {"node1": "healthy", "node2": "healthy", "node3": "healthy"}, result.stdout
            elif what == "destroy":
                assert "Destroyed; data kept." in result.stdout, output
    finally:
        down = run(["marmot-appliance", "lab", "down", "vagrant/cluster.yaml"])  # safe to run twice
        assert down.returncode == 0, down.stdout + down.stderr
    print(f"\npip install . {install_s:.0f}s; " + "; ".join(f"{what} {seconds:.0f}s" for what, seconds in timings))
    assert [kind(argv) for argv in commands][-1] == "lab down"
    assert applies == 2
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"mlab-{LAB_NAME}-" not in leftovers, leftovers


def test_unreachable_lab_host_and_lab_down_from_another_install(tmp_path):
    """A cut-off lab host: `status` from the ordinary shell says what to do about it. Then
    `lab down` from another install, whose state location holds nothing about this lab (as
    when the state is gone): the hosts are still found (machine name, overlay mount path) and
    stopped."""
    reason = _missing_capability()
    if reason:
        skip_or_fail(reason)
    spec_path = tmp_path / "cluster.yaml"
    spec = yaml.safe_load((REPO / "tests" / "specs" / "lab-supervisor.yaml").read_text())
    spec["name"] = "elsewhere"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def cli(command: str, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
        """`marmot-appliance lab COMMAND SPEC ARGS...`"""
        run_env = dict(env, MARMOT_LAB_CACHE=str(cache)) if cache else env
        return subprocess.run([sys.executable, "-m", "marmot_appliance", "lab", command, str(spec_path), *args],
                              env=run_env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)

    up = cli("up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        pids = subprocess.run(["pgrep", "-f", "--", "--machine=mlab-elsewhere-solo"], capture_output=True, text=True,
                              check=False).stdout.split()
        assert pids, "the lab host is not running"
        # From the ordinary shell, a lab host that does not answer gets what to do about it.
        assert cli("link", "solo", "down").returncode == 0
        status = subprocess.run([sys.executable, "-m", "marmot_appliance", "status", str(spec_path)], env=env,
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
        assert status.returncode == 1 and re.search(r"^solo\s+unreachable", status.stdout, re.M), status.stdout
        assert f"lab link {spec_path} HOST up" in status.stderr, status.stderr
        assert "Traceback" not in status.stderr
        assert cli("link", "solo", "up").returncode == 0
        # Another install: another state location, which holds nothing about this lab.
        down = cli("down", cache=tmp_path / "other-install-cache")
        assert down.returncode == 0, down.stdout + down.stderr
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
        assert "mlab-elsewhere-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                       check=True).stdout
        assert "/labs/elsewhere/hosts/" not in Path("/proc/self/mounts").read_text()
    finally:
        cli("down")  # the lab's own state location: safe to run twice
