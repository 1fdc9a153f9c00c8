"""The Vagrantfile: valid for Vagrant (with the libvirt provider's own checks when installed),
built from vagrant/cluster.yaml, and a broken one is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[1]


def _vagrant() -> str:
    path = shutil.which("vagrant")
    if path is None:
        skip_or_fail("vagrant is not installed (apt-get install vagrant)")
    return path


def _validate(directory: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, VAGRANT_CWD=str(directory), VAGRANT_CHECKPOINT_DISABLE="1")
    plugins = subprocess.run([_vagrant(), "plugin", "list"], capture_output=True, text=True, env=env, timeout=120)
    command = [_vagrant(), "validate"]
    if "vagrant-libvirt" in plugins.stdout:
        env["VAGRANT_DEFAULT_PROVIDER"] = "libvirt"  # validates the libvirt provider block too
    else:
        command.append("--ignore-provider")  # no provider installed here: check everything else
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _copy_project(tmp_path: Path, vagrantfile_text: str) -> Path:
    (tmp_path / "vagrant").mkdir()
    shutil.copy(REPO / "vagrant" / "cluster.yaml", tmp_path / "vagrant" / "cluster.yaml")
    (tmp_path / "Vagrantfile").write_text(vagrantfile_text)
    return tmp_path


def test_vagrantfile_validates(tmp_path):
    # A copy, so the .vagrant/ directory validate creates lands in tmp, not in the checkout.
    result = _validate(_copy_project(tmp_path, (REPO / "Vagrantfile").read_text()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_broken_vagrantfile_is_rejected(tmp_path):
    text = (REPO / "Vagrantfile").read_text().replace("config.vm.box = BOX", "config.vm.box = BOX\n  config.vm.not_a_setting = 1")
    result = _validate(_copy_project(tmp_path, text))
    assert result.returncode != 0
    assert "not_a_setting" in (result.stdout + result.stderr)


def test_vagrant_machines_follow_the_spec():
    spec = yaml.safe_load((REPO / "vagrant" / "cluster.yaml").read_text())
    hosts = [node["host"] for node in spec["nodes"]]
    assert hosts == ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
    text = (REPO / "Vagrantfile").read_text()
    # The Vagrantfile reads the spec rather than repeating it; the provisioner covers all machines.
    assert 'File.join(__dir__, "vagrant", "cluster.yaml")' in text
    assert 'ansible.limit = "all"' in text and 'ansible.inventory_path = "vagrant/cluster.yaml"' in text
