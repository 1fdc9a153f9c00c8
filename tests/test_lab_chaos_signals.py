"""The lab chaos harness's signal faults (tests/lab_chaos.py `signal_main_script`), run by a real
shell against a stand-in `systemctl` on this machine: no lab needed.

Seed 509 of the lab campaign hung because `kill -STOP $(systemctl show -p MainPID …)` ran while
systemd was restarting the node (MainPID 0): `kill -STOP 0` stopped the remote shell itself, and
its ssh session never answered (docs/reliability.md, "Lab runs")."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.lab_chaos import NO_MAIN_PROCESS, signal_main_script


def _fake_systemctl(directory: Path, main_pid: int) -> dict:
    """PATH with a `systemctl` that answers `show -p MainPID --value …` with `main_pid`."""
    script = directory / "systemctl"
    script.write_text(f"#!/bin/sh\necho {main_pid}\n")
    script.chmod(0o755)
    return {"PATH": f"{directory}:/usr/bin:/bin"}


def _run(script: str, env: dict) -> subprocess.CompletedProcess:
    # Its own session: a shell that stops its own process group must not stop pytest's.
    return subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=10,
                          start_new_session=True, check=False)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_no_main_process_is_reported_not_signalled(tmp_path):
    """MainPID 0 (the unit mid-restart): the shell answers within its wait instead of stopping
    itself (before the fix this run timed out: the shell was stopped by `kill -STOP 0`)."""
    env = _fake_systemctl(tmp_path, 0)
    started = time.monotonic()
    result = _run(signal_main_script("STOP", wait_s=1.0), env)
    assert (result.returncode, result.stdout.strip()) == (0, NO_MAIN_PROCESS), result
    assert time.monotonic() - started < 5


def test_the_main_process_is_stopped_and_resumed(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        env = _fake_systemctl(tmp_path, sleeper.pid)
        result = _run(signal_main_script("STOP", wait_s=1.0), env)
        assert (result.returncode, result.stdout.strip()) == (0, str(sleeper.pid)), result
        assert _state(sleeper.pid) == "T"
        result = _run(signal_main_script("CONT", wait_s=1.0), env)
        assert result.stdout.strip() == str(sleeper.pid), result
        assert _state(sleeper.pid) == "S"
    finally:
        sleeper.kill()
        sleeper.wait()
