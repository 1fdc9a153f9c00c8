"""Background processes: start detached, recognise them later by PID, stop them by PID.

A process started here outlives the `apply` that started it (own session, no controlling
terminal, output appended to a log file). Later commands find it through its `ProcessRecord`:
the PID alone is not proof (PIDs are reused), so a process counts as ours only when
/proc/<pid> shows the same start time and command line that were recorded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from pathlib import Path

from marmot_appliance.appliance.errors import ApplianceError
from marmot_appliance.appliance.state import ProcessRecord

STOP_TIMEOUT_S = 20.0  # SIGTERM grace (node runtimes drain NATS), then SIGKILL
_STARTED: list[subprocess.Popen] = []


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a PID, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[19])


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_running(record: ProcessRecord) -> bool:
    """True when the recorded process is alive and still the same program (not a reused PID)."""
    stat = _proc_stat(record.pid)
    if stat is None:
        return False
    state, start_ticks = stat
    if state in ("Z", "X") or start_ticks != record.start_ticks:
        return False
    return _proc_cmdline(record.pid) == record.argv


def start_process(
    resource: str,
    argv: list[str],
    log_path: Path,
    config_hash: str,
    cwd: Path,
    env: dict[str, str] | None = None,
) -> ProcessRecord:
    """Start `argv` detached, stdout+stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {resource}\n".encode())
        log.flush()
        try:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,  # no SIGINT/SIGHUP from the terminal that ran apply
                close_fds=True,
            )
        except OSError as exc:
            raise ApplianceError(f"cannot start {resource} ({argv[0]}): {exc.strerror}") from exc
    # The process is meant to outlive this Popen object; holding on to it keeps `subprocess`
    # from warning "still running" when it would be garbage collected.
    _STARTED.append(child)
    stat = _proc_stat(child.pid)
    if stat is None:
        raise ApplianceError(f"{resource} (pid {child.pid}) vanished right after start; see {log_path}")
    # Popen returns once exec has begun, but the kernel fills in the new command line a moment
    # later (an empty /proc/<pid>/cmdline in between). Record what /proc will show from now on.
    cmdline = _proc_cmdline(child.pid)
    deadline = time.monotonic() + 5.0
    while cmdline != list(argv) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        cmdline = _proc_cmdline(child.pid)
    return ProcessRecord(
        resource=resource,
        config_hash=config_hash,
        pid=child.pid,
        argv=cmdline or list(argv),
        start_ticks=stat[1],
        log_path=str(log_path),
        started_at=time.time(),
    )


def _reap_if_child(pid: int) -> None:
    """When the process is our own child (tests call apply in-process), collect its exit status."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _gone(record: ProcessRecord) -> bool:
    _reap_if_child(record.pid)
    return not is_running(record)


def stop_process(record: ProcessRecord, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop a recorded process by PID: SIGTERM, then SIGKILL. Returns False if it was not running.

    Only the recorded PID is signalled, and only after checking it is still the recorded
    program, so a reused PID is never hit.
    """
    if not is_running(record):
        _reap_if_child(record.pid)
        return False
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.kill(record.pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError as exc:
            raise ApplianceError(
                f"not allowed to stop {record.resource} (pid {record.pid}); run as the user that applied"
            ) from exc
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if _gone(record):
                return True
            time.sleep(0.05)
    raise ApplianceError(f"{record.resource} (pid {record.pid}) survived SIGKILL")


def exit_status(record: ProcessRecord) -> str:
    """A short description of a process that is not running, for error messages."""
    if is_running(record):
        return f"running (pid {record.pid})"
    return f"not running (was pid {record.pid})"


def log_tail(path: Path | str, lines: int = 20) -> str:
    """The last lines of a log file (empty when there is none)."""
    try:
        with open(path, errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except OSError:
        return ""
