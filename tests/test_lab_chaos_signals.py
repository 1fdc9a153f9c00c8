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


def _fake_systemctl(directory: Path, main_pid: int) -> dict[str, str]:
    """PATH with a `systemctl` that answers `show -p MainPID --value …` with `main_pid`."""
    script = directory / "systemctl"
    script.write_text(f"#!/bin/sh\necho {main_pid}\n")
    script.chmod(0o755)
    return {"PATH": f"{directory}:/usr/bin:/bin"}


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Its own session: a shell that stops its own process group must not stop pytest's.
    return subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=10,
                          start_new_session=True, check=False)


def _state_becomes(pid: int, wanted: str, timeout_s: float = 5) -> str:
    """The process's state letter once it is `wanted` (a signal is delivered when the target next
    runs, after kill() returned), or the last one seen after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == wanted or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def test_no_main_process_is_reported_not_signalled(tmp_path: Path) -> None:
    """MainPID 0 (the unit mid-restart): the shell answers within its wait instead of stopping
    itself (before the fix this run timed out: the shell was stopped by `kill -STOP 0`)."""
    env = _fake_systemctl(tmp_path, 0)
    started = time.monotonic()
    result = _run(signal_main_script("STOP", wait_s=1.0), env)
    assert (result.returncode, result.stdout.strip()) == (0, NO_MAIN_PROCESS), result
    assert time.monotonic() - started < 9  # its 1 s wait, plus a loaded machine


def test_the_main_process_is_stopped_and_resumed(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        env = _fake_systemctl(tmp_path, sleeper.pid)
        result = _run(signal_main_script("STOP", wait_s=1.0), env)
        assert (result.returncode, result.stdout.strip()) == (0, str(sleeper.pid)), result
        assert _state_becomes(sleeper.pid, "T") == "T"
        result = _run(signal_main_script("CONT", wait_s=1.0), env)
        assert result.stdout.strip() == str(sleeper.pid), result
        assert _state_becomes(sleeper.pid, "S") == "S"
    finally:
        sleeper.kill()
        sleeper.wait()
