"""Run lab commands with timeouts; failures become `LabError` with the command's output."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from marmot_appliance.errors import MarmotError


class LabError(MarmotError):
    """The lab could not be built, reached or torn down."""


def run(
    command: Sequence[str],
    *,
    check: bool = True,
    timeout_s: float = 120.0,
    input_text: str | None = None,
) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise LabError(f"{command[0]} not found; install the lab packages (see docs/deploy.md)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout_s:.0f}s: {' '.join(command)}") from exc
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()[-2000:]
        raise LabError(f"command failed ({result.returncode}): {' '.join(command)}\n{detail}")
    return result
