"""Helpers for the verify/repair tests: run the real CLI, and write a replica with capture bypassed."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from marmot_appliance.replication.applier import _MARKER_OFF_SQL, _MARKER_ON_SQL

CLI_TIMEOUT_S = 300


async def run_cli(*argv: str) -> tuple[int, dict | str, str]:
    """Run `python -m marmot_appliance ARGV` off the event loop: (exit code, parsed JSON or text, stderr)."""

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "marmot_appliance", *argv], capture_output=True, text=True,
                              timeout=CLI_TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    done = await asyncio.to_thread(run)
    try:
        out: dict | str = json.loads(done.stdout)
    except ValueError:
        out = done.stdout
    return done.returncode, out, done.stderr


async def verify(nats_url: str, *extra: str, nodes: int = 3) -> tuple[int, dict | str, str]:
    return await run_cli("verify", "--nats-url", nats_url, "--expect-nodes", str(nodes), "--output", "json", *extra)


def write_bypassing_capture(db: Path, sql: str, params: tuple = ()) -> None:
    """Change a replica's file the way a bug or a manual edit would: the capture triggers do not fire.

    The applier's marker row makes the triggers skip the write (see applier.py), so nothing is
    logged, published or versioned: the file silently differs from the other copies.
    """
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_MARKER_ON_SQL)
        conn.execute(sql, params)
        conn.execute(_MARKER_OFF_SQL)
        conn.execute("COMMIT")
    finally:
        conn.close()


def findings(report: dict, table: str) -> dict[str, dict]:
    """repr(key) -> finding of one table in a JSON verify report."""
    for entry in report["tables"]:
        if entry["table"] == table:
            return {repr(k["key"]): k for k in entry["keys"]}
    raise AssertionError(f"table {table} not in the report: {report}")
