"""Helpers for the appliance tests (no tests here): spec copies on free ports, and running the
CLI as an unprivileged user when the test runs as root.

As root the CLI runs as `nobody` through setpriv, in a directory under /tmp owned by nobody
(pytest's own tmp_path lives under a 0700 root directory nobody cannot enter), so the tests
prove apply needs no root: every nats-server and node runtime it starts runs as nobody. If
nobody cannot run this interpreter (see `_interpreters`) and no fallback works, or without
root or setpriv, the CLI runs as the current user.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.harness import free_ports

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_SPEC = REPO / "examples" / "local-3-node.yaml"
CLI_TIMEOUT_S = 300  # apply waits for health itself; this only stops a hung CLI


SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
_PROBE = (
    "import subprocess, sys; "
    "subprocess.run([sys.executable, '-c', 'import marmot_appliance, nats, zstandard, cbor2, yaml'], check=True)"
)


@dataclass(frozen=True)
class CliRunner:
    """How to run the CLI: as whom (prefix), with which interpreter and extra environment."""

    prefix: tuple[str, ...]
    python: str
    env: tuple[tuple[str, str], ...]
    user: pwd.struct_passwd | None


def _interpreters() -> list[tuple[str, dict[str, str]]]:
    """This interpreter, then the system one of the same version pointed at our packages.

    nobody cannot exec an interpreter under a 0700 home directory (e.g. pyenv in /root), which
    apply needs to launch node runtimes; the system interpreter of the same minor version runs
    the same site-packages (same ABI) when given them on PYTHONPATH.
    """
    candidates = [(sys.executable, {})]
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if system.is_file() and Path(sys.executable).resolve() != system.resolve():
        from marmot_appliance.natsd.binary import nats_server_path

        site_packages = sysconfig.get_paths()["purelib"]
        candidates.append(
            (
                str(system),
                {
                    "PYTHONPATH": os.pathsep.join([site_packages, str(REPO)]),
                    "MARMOT_NATS_SERVER": str(nats_server_path()),
                },
            )
        )
    return candidates


@functools.lru_cache(maxsize=1)
def cli_runner() -> CliRunner:
    """As root: `nobody` through setpriv, with the first interpreter nobody can run and start
    again. Otherwise (not root, no setpriv, no usable interpreter): the current user."""
    current = CliRunner((), sys.executable, (), None)
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return current
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        return current
    for python, extra in _interpreters():
        env = {**os.environ, **extra}
        try:
            result = subprocess.run(
                [*SETPRIV, python, "-c", _PROBE], cwd="/", env=env, capture_output=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode == 0:
            return CliRunner(tuple(SETPRIV), python, tuple(sorted(extra.items())), user)
    return current


def unprivileged_user() -> pwd.struct_passwd | None:
    return cli_runner().user


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
    # The example's schema files (notes.sql) stay where they are; the copy names them absolutely.
    data["schema"] = [str(EXAMPLE_SPEC.parent / entry) for entry in data.get("schema", [])]
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
    runner = cli_runner()
    env = {**os.environ, **dict(runner.env)}
    env.update(HOME=str(workdir), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [*runner.prefix, runner.python, "-m", "marmot_appliance", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
