"""The command blocks of the docs, run or parsed as written, so they cannot drift.

- README's quick start runs verbatim against a real local cluster (three nats-servers, three
  node runtimes) in a copy of `examples/` whose ports are free ones; the command lines are the
  README's own.
- The lab sequence of docs/deploy.md is run by tests/test_lab_newuser.py (root, the lab); here
  every line of it must be a command line the CLI accepts, in the documented order.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from marmot_appliance.cli import build_parser
from tests.harness import free_ports
from tests.lab_sequence import kind, lab_sequence

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _sh_blocks(path: Path) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", path.read_text(), re.S | re.M)


def test_lab_sequence_is_the_documented_order_of_valid_commands():
    commands = lab_sequence()
    kinds = [kind(argv) for argv in commands]
    assert kinds[0] == "lab up" and kinds[-1] == "lab down"
    assert kinds.count("apply") == 2 and kinds.index("status") < len(kinds) - 1 - kinds[::-1].index("apply")
    assert "destroy" in kinds
    parser = build_parser()
    for argv in commands:
        assert argv[0] == "marmot-appliance", argv
        assert "vagrant/cluster.yaml" in argv, argv
        parser.parse_args(argv[1:])  # exits (SystemExit) on a line the CLI would refuse


@pytest.fixture
def quick_start_dir(tmp_path) -> Path:
    """A copy of examples/ with free ports: the README's command lines run there unchanged."""
    examples = tmp_path / "examples"
    examples.mkdir()
    for path in (REPO / "examples").iterdir():
        if path.is_file():  # the spec's schema files and the other examples, not data/ or state
            shutil.copy2(path, examples / path.name)
    spec = yaml.safe_load((REPO / "examples" / "local-3-node.yaml").read_text())
    ports = iter(free_ports(4 * len(spec["nodes"])))
    for node in spec["nodes"]:
        node["ports"] = {name: next(ports) for name in ("client", "cluster", "monitor", "metrics")}
    (examples / "local-3-node.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path


def _shell(line: str, cwd: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the quick start uses the sqlite3 shell")
def test_readme_quick_start_runs_verbatim(quick_start_dir):
    """Install line aside (tests/test_lab_newuser.py does a plain install), every README
    quick-start command runs as printed: apply, the sqlite3 lines, status, destroy."""
    bin_dir = quick_start_dir / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "marmot-appliance"  # this checkout's CLI, as `.venv/bin/marmot-appliance`
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} -m marmot_appliance \"$@\"\n")
    launcher.chmod(0o755)
    (quick_start_dir / ".venv").mkdir()
    (quick_start_dir / ".venv" / "bin").symlink_to(bin_dir)
    blocks = _sh_blocks(README)
    install = next(line for line in blocks[0].splitlines() if "pip install ." in line)
    apply_line = install.split("&&")[-1].strip()
    assert apply_line == ".venv/bin/marmot-appliance apply examples/local-3-node.yaml"
    prose = README.read_text()
    status_line = re.search(r"`(marmot-appliance status examples/local-3-node\.yaml)`", prose).group(1)
    destroy_line = re.search(r"`(marmot-appliance destroy examples/local-3-node\.yaml)`", prose).group(1)
    notes = next(block for block in blocks if "INSERT INTO notes" in block)
    applied = _shell(apply_line, quick_start_dir, bin_dir)
    try:
        assert applied.returncode == 0, applied.stdout + applied.stderr
        outputs = []
        for line in notes.splitlines():
            for _attempt in range(30):  # the read repeats (its own `sleep 1` each time) on a slow machine
                result = _shell(line, quick_start_dir, bin_dir)
                if "SELECT" not in line or result.stdout.strip():
                    break
            assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
            outputs.append(result.stdout)
        assert outputs[-1].strip() == "hello|from n1", outputs  # the README's "-> hello|from n1"
        status = _shell(status_line, quick_start_dir, bin_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        # docs/appliance.md's block on the same running cluster: plan, apply, status, destroy.
        for line in _sh_blocks(REPO / "docs" / "appliance.md")[0].splitlines():
            result = _shell(line, quick_start_dir, bin_dir)
            assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
            if " plan " in line or " apply " in line:
                assert "No changes." in result.stdout, f"{line}\n{result.stdout}"
        assert not (quick_start_dir / "examples" / ".marmot-appliance" / "local").exists()  # destroy --purge
    finally:
        destroyed = _shell(destroy_line, quick_start_dir, bin_dir)
    assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr


DOCUMENTED = [README, *sorted((REPO / "docs").glob("*.md"))]


def _documented_command_lines() -> list[tuple[str, str]]:
    lines = []
    for path in DOCUMENTED:
        for block in _sh_blocks(path):
            for line in block.splitlines():
                text = line.strip()
                if text.startswith("sudo "):
                    text = text[len("sudo "):]
                if text.startswith("marmot-appliance "):
                    lines.append((path.name, text))
    return lines


@pytest.mark.parametrize("where, line", _documented_command_lines())
def test_every_documented_marmot_appliance_line_is_accepted_by_the_cli(where, line):
    """Flags and sub-commands in the docs exist: each line parses (placeholders `[...]` aside)."""
    import shlex

    argv = shlex.split(re.sub(r"\[[^\]]*\]", "", line), comments=True)
    build_parser().parse_args(argv[1:])


def test_spec_md_validate_examples_print_what_the_page_shows():
    """docs/spec.md shows `validate` runs with their output as comments: run them in the checkout."""
    block = next(b for b in _sh_blocks(REPO / "docs" / "spec.md") if "validate examples/invalid.yaml" in b)
    runs: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("marmot-appliance "):
            runs.append((line.split("#")[0].strip(), []))
        elif line.startswith("# ") and runs:
            runs[-1][1].append(line[2:])
    assert sum(1 for _, expected in runs if expected) >= 2
    for command, expected in runs:
        result = subprocess.run([sys.executable, "-m", "marmot_appliance", *command.split()[1:]], cwd=REPO,
                                capture_output=True, text=True, timeout=120, check=False)
        printed = (result.stdout + result.stderr).splitlines()
        assert printed[:len(expected)] == expected, f"{command}:\n" + "\n".join(printed)
