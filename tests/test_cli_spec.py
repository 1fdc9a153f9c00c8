"""`marmot-appliance validate` and `config show`, run as the real console script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import skip_or_fail
from tests.spec_helpers import EXAMPLES, MINIMAL, REPO
from tests.test_appliance_support import chown_tree, cli_runner, make_workdir

SCRIPT = Path(sys.executable).parent / "marmot-appliance"


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "100"}
    )


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr


def test_console_script_is_installed():
    assert SCRIPT.is_file(), f"{SCRIPT} missing: is the package installed into this venv?"


def test_validate_example_exits_0():
    result = run("validate", "examples/local-3-node.yaml", "examples/lab-3-host.yaml")
    assert result.returncode == 0, result.stderr
    assert "examples/local-3-node.yaml: valid (cluster 'local', 3 nodes)" in result.stdout
    assert "examples/lab-3-host.yaml: valid (cluster 'lab', 3 nodes)" in result.stdout


def test_validate_quiet_prints_nothing_for_valid_files():
    result = run("validate", "--quiet", "examples/local-3-node.yaml")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


def test_validate_invalid_example_prints_one_located_line_per_mistake():
    result = run("validate", "examples/invalid.yaml")
    assert result.returncode == 1
    assert_no_traceback(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 7, result.stderr
    for line in lines:
        assert re.match(r"^examples/invalid\.yaml:\d+:\d+: \$\S*: \S.*$", line), line
    paths = [line.split(": ")[1] for line in lines]
    assert paths == [
        "$.name", "$.replication.shards", "$.replication.log_replicas", "$.nats.client_prot",
        "$.nodes[1].id", "$.nodes[2].db", "$.nodes[2].db",
    ]


def test_validate_several_files_fails_when_any_fails():
    result = run("validate", "examples/local-3-node.yaml", "examples/invalid.yaml")
    assert result.returncode == 1
    assert "local-3-node.yaml: valid" in result.stdout and "invalid.yaml:7:7:" in result.stderr


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        ("", "the file is empty"),
        ("a: [1, 2\n", "invalid YAML"),
        (b"\xff\xfe\x00garbage", "not UTF-8 text"),
        ("apiVersion: marmot-appliance/v2\nkind: Cluster\n", "supported: marmot-appliance/v1"),
    ],
)
def test_validate_bad_files_exit_1_with_a_message(tmp_path, content, expected):
    path = tmp_path / "spec.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = run("validate", str(path))
    assert result.returncode == 1
    assert_no_traceback(result)
    assert expected in result.stderr
    assert result.stderr.startswith(str(path))


def test_validate_a_directory(tmp_path):
    result = run("validate", str(tmp_path))
    assert result.returncode == 1
    assert_no_traceback(result)
    assert "is a directory" in result.stderr


def test_validate_unreadable_file():
    """As root the CLI runs as nobody (root reads files whatever their mode)."""
    runner = cli_runner()
    if os.geteuid() == 0 and runner.user is None:
        skip_or_fail("as root this needs setpriv and a 'nobody' user to make a file unreadable")
    workdir = make_workdir()
    try:
        path = workdir / "spec.yaml"
        path.write_text(MINIMAL)
        chown_tree(workdir)
        path.chmod(0)
        result = subprocess.run(
            [*runner.prefix, runner.python, "-m", "marmot_appliance", "validate", str(path)],
            capture_output=True, text=True, cwd=workdir, env={**os.environ, **dict(runner.env)}, timeout=60,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert result.returncode == 1 and "permission denied" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_config_show_prints_a_valid_fully_defaulted_spec(tmp_path):
    result = run("config", "show", "examples/local-3-node.yaml")
    assert result.returncode == 0, result.stderr
    document = yaml.safe_load(result.stdout)
    assert document["replication"]["max_log_entries"] == 100000
    assert document["nodes"][1]["ports"] == {"client": 4223, "cluster": 6223, "monitor": 8223, "metrics": 9471}
    assert document["nodes"][0]["db"] == str(EXAMPLES / "data" / "n1.db")
    assert document["nats"]["auth"]["mode"] == "generated"
    shown = tmp_path / "shown.yaml"
    shown.write_text(result.stdout)
    again = run("config", "show", str(shown))
    assert again.returncode == 0, again.stderr
    assert yaml.safe_load(again.stdout) == document
    assert run("validate", str(shown)).returncode == 0


def test_config_show_quotes_yaml11_words(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MINIMAL + 'deploy: {ssh_user: "no"}\n')
    result = run("config", "show", str(spec))
    assert result.returncode == 0, result.stderr
    assert "ssh_user: 'no'" in result.stdout
    shown = tmp_path / "shown.yaml"
    shown.write_text(result.stdout)
    assert run("validate", str(shown)).returncode == 0


def test_config_show_json():
    result = run("config", "show", "--format", "json", "examples/lab-3-host.yaml")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["nodes"][2]["host"] == "10.77.0.13"


def test_config_show_invalid_spec_exits_1():
    result = run("config", "show", "examples/invalid.yaml")
    assert result.returncode == 1 and result.stdout == ""
    assert_no_traceback(result)
    assert "examples/invalid.yaml:7:7: $.name:" in result.stderr


def test_config_without_subcommand_and_missing_arguments_exit_1():
    for args in (("config",), ("validate",), ("config", "show")):
        result = run(*args)
        assert result.returncode == 1, args
        assert_no_traceback(result)


def _subcommands() -> list[tuple[str, ...]]:
    import argparse

    from marmot_appliance.cli import build_parser

    commands: list[tuple[str, ...]] = [()]

    def visit(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    commands.append(prefix + (name,))
                    visit(sub, prefix + (name,))

    visit(build_parser(), ())
    return commands


@pytest.mark.parametrize("command", _subcommands(), ids=lambda c: " ".join(c) or "top")
def test_help_on_every_subcommand(command):
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: marmot-appliance")
    assert_no_traceback(result)


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("marmot-appliance ")


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_remote_spec_with_nkey_auth_is_refused_before_any_host_is_touched(tmp_path, command):
    spec = yaml.safe_load((EXAMPLES / "lab-3-host.yaml").read_text())
    seed = tmp_path / "user.nk"
    seed.write_text("SUAEXAMPLEONLY\n")
    spec["nats"]["auth"] = {"mode": "nkey", "nkey_seed_file": str(seed)}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run(command, str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nkey" in result.stderr and "cannot be deployed to hosts yet" in result.stderr
    assert_no_traceback(result)
