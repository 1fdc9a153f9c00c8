"""Helpers for the appliance tests (no tests here): spec copies on free ports, and running the
CLI as an unprivileged user when the test runs as root.

As root the CLI runs as `nobody` through setpriv, in a directory under /tmp owned by nobody
(pytest's own tmp_path lives under a 0700 root directory nobody cannot enter). That way the
tests prove apply needs no root. Without root (or setpriv) the CLI runs as the current user.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.harness import free_ports

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_SPEC = REPO / "examples" / "local-3-node.yaml"
CLI_TIMEOUT_S = 300  # apply waits for health itself; this only stops a hung CLI


SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@functools.lru_cache(maxsize=1)
def unprivileged_user() -> pwd.struct_passwd | None:
    """`nobody`, when running as root and nobody can run this interpreter *and* start it again
    (apply launches node runtimes with sys.executable). An interpreter under a 0700 home
    directory (e.g. pyenv in /root) cannot be exec'd by nobody: then the CLI runs as the
    current user."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        return None
    probe = (
        "import subprocess, sys; "
        "subprocess.run([sys.executable, '-c', 'import marmot_appliance, nats'], check=True)"
    )
    try:
        result = subprocess.run(
            [*SETPRIV, sys.executable, "-c", probe], cwd="/", capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return user if result.returncode == 0 else None


def make_workdir() -> Path:
    """A fresh directory the CLI's user can write (removed by the caller)."""
    path = Path(tempfile.mkdtemp(prefix="marmot-appliance-test-"))
    user = unprivileged_user()
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(0o755)
    return path


def chown_tree(path: Path) -> None:
    """Hand files the test wrote (as root) to the CLI's user."""
    user = unprivileged_user()
    if user is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid)


def spec_data(nodes: int = 3) -> dict:
    """The quick-start example (or an equivalent), every port replaced by a free one."""
    if EXAMPLE_SPEC.exists():
        data = yaml.safe_load(EXAMPLE_SPEC.read_text())
    else:
        data = {
            "apiVersion": "marmot-appliance/v1",
            "kind": "Cluster",
            "name": "local",
            "nodes": [
                {"name": f"n{i}", "id": i, "host": "127.0.0.1", "db": f"data/n{i}.db"} for i in (1, 2, 3)
            ],
        }
    data["nodes"] = data["nodes"][:nodes]
    ports = free_ports(4 * len(data["nodes"]))
    for i, node in enumerate(data["nodes"]):
        client, cluster, monitor, metrics = ports[i * 4 : i * 4 + 4]
        node["ports"] = {"client": client, "cluster": cluster, "monitor": monitor, "metrics": metrics}
    # Quicker reactions than the production defaults, so tests do not wait on poll intervals.
    data.setdefault("replication", {})["poll_interval_ms"] = 100
    return data


def write_spec(workdir: Path, data: dict, name: str = "cluster.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    chown_tree(workdir)
    return path


def run_cli(workdir: Path, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`marmot-appliance ARGS` in `workdir`, as the unprivileged user when possible."""
    prefix: list[str] = []
    user = unprivileged_user()
    if user is not None:
        prefix = SETPRIV
    env = dict(os.environ)
    env.update(HOME=str(workdir), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [*prefix, sys.executable, "-m", "marmot_appliance", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
