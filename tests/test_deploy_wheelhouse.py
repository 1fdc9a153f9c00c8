"""The controller's wheelhouse from a plain (non-editable) install: no source tree, no hatchling.

The README installs with `pip install .`; the Ansible role then asks the controller for a
wheelhouse. The project wheel must come from the installed package itself (or the checkout
the playbook lives in), never an error telling the user to go and build wheels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory) -> Path:
    """The package installed like `pip install .` does: a wheel unpacked into site-packages.

    Installed into a bare target directory (dependencies come from this venv), so the
    controller code runs from there: no pyproject.toml beside it, not editable.
    """
    scratch = tmp_path_factory.mktemp("plain")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(scratch / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((scratch / "dist").glob("marmot_appliance-*.whl"))
    site = scratch / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return site


def _run_plain(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))  # the plain install wins over any checkout
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900, check=False)


def test_plain_install_runs_from_site_packages(plain_install, tmp_path):
    result = _run_plain(plain_install, "-c", "import marmot_appliance; print(marmot_appliance.__file__)", cwd=tmp_path)
    assert result.stdout.strip().startswith(str(plain_install)), result.stdout + result.stderr


def test_wheelhouse_from_a_plain_install_carries_the_installed_package(plain_install, tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    result = _run_plain(plain_install, "-m", "marmot_appliance.deploy.controller", "wheelhouse", str(wheelhouse),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["origin"] == "the installed package", report
    wheel = wheelhouse / report["project_wheel"]
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        record = archive.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
    assert "marmot_appliance/cli/__init__.py" in names
    assert "marmot_appliance/ansible/site.yml" in names  # the shipped playbook travels too
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    assert all(line.split(",")[0] in names for line in record.splitlines())
    # The rebuilt wheel installs into a fresh directory with every installed file, unchanged.
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(again),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    for path in (plain_install / "marmot_appliance").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            copy = again / path.relative_to(plain_install)
            assert copy.read_bytes() == path.read_bytes(), path
    assert (again / "bin" / "marmot-appliance").is_file()  # console script from entry_points.txt
    # Offline hosts get the same bytes next time: the second run changes nothing.
    first = wheel.read_bytes()
    second = _run_plain(plain_install, "-m", "marmot_appliance.deploy.controller", "wheelhouse", str(wheelhouse),
                        cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["changed"] is False
    assert wheel.read_bytes() == first


def test_wheelhouse_prefers_the_checkout_the_playbook_lives_in(plain_install, tmp_path):
    """With hatchling present (this venv), the checkout next to the playbook is built."""
    script = (
        "import sys\nfrom pathlib import Path\nfrom marmot_appliance.deploy.wheelhouse import obtain_project_wheel\n"
        "wheel, origin = obtain_project_wheel(Path(sys.argv[1]), checkout=Path(sys.argv[2]))\nprint(origin)\n"
    )
    result = _run_plain(plain_install, "-c", script, str(tmp_path / "out"), str(REPO), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"built from {REPO}"
