"""The roles' host probe (ansible/plugins/modules/marmot_host_probe.py), run as Ansible runs a
module, on local paths: it reports a match only where the real task would change nothing."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "ansible" / "plugins" / "modules" / "marmot_host_probe.py"


def _probe(tmp_path: Path, **args: Any) -> dict[str, Any]:
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    result = subprocess.run([sys.executable, str(MODULE), str(args_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_reports_only_exact_matches(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.getuid())
    group = grp.getgrgid(os.getgid()).gr_name
    wanted = {"owner": me.pw_name, "group": group, "mode": "0750"}
    good, wrong_mode, target = tmp_path / "good", tmp_path / "wrong-mode", tmp_path / "target"
    for path in (good, wrong_mode, target):
        path.mkdir()
        path.chmod(0o750)
    wrong_mode.chmod(0o755)
    (tmp_path / "link").symlink_to(target)

    content = b"[Unit]\n"
    checksum = hashlib.sha1(content).hexdigest()  # noqa: S324 (copy's checksum)
    same, edited = tmp_path / "same.service", tmp_path / "edited.service"
    for path in (same, edited):
        path.write_bytes(content)
        path.chmod(0o640)
    edited.write_bytes(content + b"# edited\n")
    file_wanted = {"owner": me.pw_name, "group": group, "mode": "0640", "checksum": checksum}

    result = _probe(
        tmp_path,
        paths=[str(good), str(tmp_path / "absent")],
        groups=[group, "no-such-group-marmot"],
        users=[{"name": me.pw_name, "group": group, "home": me.pw_dir, "shell": me.pw_shell},
               {"name": me.pw_name, "group": group, "home": me.pw_dir, "shell": "/bin/other-shell"}],
        directories=[{**wanted, "path": [str(good), str(wrong_mode), str(tmp_path / "link"), str(tmp_path / "absent")]},
                     {**wanted, "path": str(good), "owner": "no-such-user-marmot"}],
        files=[{**file_wanted, "path": str(same)}, {**file_wanted, "path": str(edited)},
               {**file_wanted, "path": str(same), "mode": "0600"}],
    )
    assert result["changed"] is False
    assert result["missing"] == [str(tmp_path / "absent")]
    assert result["groups"] == [group]
    assert result["users"] == [me.pw_name]  # the second entry (another shell) does not match
    assert result["directories"] == [str(good)]  # not the wrong mode, the symlink, the missing one, another owner
    assert result["files"] == [str(same)]  # not the edited one, nor the same one wanted with another mode
    # The checksums may be those of files holding secrets: never in the logged invocation.
    assert checksum not in json.dumps(result["invocation"])


def test_units_not_confirmed_are_not_reported(tmp_path: Path) -> None:
    # Without systemd (or for a unit that does not exist) nothing is reported as running.
    assert _probe(tmp_path, units=["no-such-unit-marmot"])["units"] == []
