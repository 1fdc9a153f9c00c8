"""The controller's wheelhouse: the project wheel plus every wheel it needs, for offline hosts.

Hosts have no internet. The controller gets the project wheel (built offline from a source
tree with hatchling, or re-zipped from the installed package, or from the index: see
`obtain_project_wheel`) and downloads the dependency wheels once (the only
step that needs a package index); the role copies the directory and installs it with
`pip install --no-index --find-links`. `SHA256SUMS` lists every wheel with its digest, so a host
reinstalls exactly when the set changed. Builds are reproducible (hatchling's fixed timestamps),
so rebuilding unchanged sources changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from marmot_appliance.deploy.errors import DeployError

MANIFEST = "SHA256SUMS"
ARCHIVE = "wheelhouse.tar"
RESOLVED_STAMP = ".resolved"  # the wheel set that last resolved offline, and for which targets  # what the role copies: one file, one checksum round trip per host
PIP_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class WheelhouseResult:
    directory: Path
    project_wheel: str
    changed: bool
    downloaded: bool
    origin: str = ""  # where the project wheel came from


def project_source_dir() -> Path | None:
    """The source tree this package runs from, when it is a checkout (editable install)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "marmot_appliance").is_dir() else None


def _pip(args: list[str], timeout_s: float = PIP_TIMEOUT_S) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DeployError(f"pip timed out after {timeout_s:.0f}s: {' '.join(args)}") from exc


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def build_project_wheel(source: Path, into: Path) -> Path:
    """Build the project wheel without a package index (needs hatchling installed here)."""
    result = _pip(["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(into), str(source)])
    if result.returncode != 0:
        result = _pip(["wheel", "--no-deps", "-w", str(into), str(source)])  # isolated: needs an index
    if result.returncode != 0:
        raise DeployError(
            "could not build the marmot-appliance wheel (install hatchling on the controller):\n"
            + (result.stderr or result.stdout)[-2000:]
        )
    wheels = sorted(into.glob("marmot_appliance-*.whl"))
    if not wheels:
        raise DeployError(f"pip wheel produced no marmot_appliance wheel in {into}")
    return wheels[-1]


def dependencies_complete(directory: Path, project_wheel: Path, target_args: list[str]) -> bool:
    """Can pip resolve the project and all its dependencies from the directory alone?"""
    result = _pip(
        ["install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(directory),
         *target_args, str(project_wheel)],
        timeout_s=300,
    )
    return result.returncode == 0


def _resolution_key(directory: Path, target_args: list[str], extra: list[str]) -> str:
    """What a successful offline resolution depended on: every wheel's digest and the targets."""
    wheels = [f"{_digest(path)}  {path.name}" for path in sorted(directory.glob("*.whl"))]
    return "\n".join([*wheels, "targets: " + " ".join(target_args), "extra: " + " ".join(extra)]) + "\n"


def write_manifest(directory: Path) -> bool:
    lines = [f"{_digest(path)}  {path.name}" for path in sorted(directory.glob("*.whl"))]
    text = "\n".join(lines) + "\n"
    manifest = directory / MANIFEST
    if manifest.is_file() and manifest.read_text() == text:
        return False
    manifest.write_text(text)
    return True


def write_archive(directory: Path) -> bool:
    """A deterministic tar of the wheels and the manifest; rewritten only when it differs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(directory.glob("*.whl")) + [directory / MANIFEST]:
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0  # same bytes for the same wheels: the copy task stays unchanged
            with open(path, "rb") as handle:
                archive.addfile(info, handle)
    data = buffer.getvalue()
    target = directory / ARCHIVE
    if target.is_file() and target.read_bytes() == data:
        return False
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return True


def pack_wheelhouse(directory: Path) -> bool:
    """Manifest + archive of an existing directory of wheels (deploy.package_source: DIR)."""
    if not any(directory.glob("marmot_appliance-*.whl")):
        raise DeployError(f"{directory} holds no marmot_appliance wheel")
    changed = write_manifest(directory)
    return write_archive(directory) or changed


def _is_project_checkout(directory: Path) -> bool:
    pyproject = directory / "pyproject.toml"
    return pyproject.is_file() and (directory / "marmot_appliance").is_dir() and (
        'name = "marmot-appliance"' in pyproject.read_text()
    )


def _download_project_wheel(into: Path, target_args: list[str]) -> Path:
    """The published wheel of this very version, from the package index."""
    from marmot_appliance import __version__

    result = _pip(["download", "--no-deps", "--only-binary=:all:", "-d", str(into), *target_args,
                   f"marmot-appliance=={__version__}"], timeout_s=300)
    wheels = sorted(into.glob("marmot_appliance-*.whl"))
    if result.returncode != 0 or not wheels:
        raise DeployError(
            f"could not obtain a marmot-appliance {__version__} wheel from the package index:\n"
            + (result.stderr or result.stdout)[-1500:]
        )
    return wheels[-1]


def obtain_project_wheel(into: Path, source: Path | None = None, checkout: Path | None = None,
                         target_args: list[str] | None = None) -> tuple[Path, str]:
    """The project wheel and where it came from, in this order:

    1. `source`, or the source tree of an editable install: built (hatchling, offline first);
    2. `checkout`, the source tree the playbook lives in: built offline when hatchling is here;
    3. the installed package itself, re-zipped from its RECORD (a plain `pip install`);
    4. the package index (this version, published).
    """
    from marmot_appliance.deploy.installed_wheel import build_installed_wheel, installed_dist_info, is_editable

    source = source or project_source_dir()
    if source is not None:
        return build_project_wheel(source, into), f"built from {source}"
    problems = []
    if checkout is not None and _is_project_checkout(checkout):
        result = _pip(["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(into), str(checkout)])
        wheels = sorted(into.glob("marmot_appliance-*.whl"))
        if result.returncode == 0 and wheels:
            return wheels[-1], f"built from {checkout.resolve()}"
        problems.append(f"{checkout.resolve()}: no offline build (hatchling not installed here)")
    dist_info = installed_dist_info()
    if dist_info is not None and not is_editable(dist_info):
        try:
            return build_installed_wheel(into), "the installed package"
        except DeployError as exc:
            problems.append(str(exc))
    try:
        return _download_project_wheel(into, list(target_args or [])), "the package index"
    except DeployError as exc:
        raise DeployError("no marmot-appliance wheel for the hosts:\n  "
                          + "\n  ".join([*problems, str(exc)])) from exc


def build_wheelhouse(
    directory: Path,
    source: Path | None = None,
    target_args: list[str] | None = None,
    extra_requirements: list[str] | None = None,
    checkout: Path | None = None,
) -> WheelhouseResult:
    """Bring `directory` up to date; only touches files whose content changed.

    `target_args` (e.g. `--python-version 3.11 --platform manylinux2014_x86_64`) select wheels
    for hosts unlike the controller; `extra_requirements` adds wheels such as `supervisor`;
    `checkout` is the source tree the playbook lives in (see `obtain_project_wheel`).
    """
    target_args = list(target_args or [])
    extra = list(extra_requirements or [])
    directory.mkdir(parents=True, exist_ok=True)
    changed = False
    with tempfile.TemporaryDirectory(prefix="marmot-wheel-") as scratch:
        built, origin = obtain_project_wheel(Path(scratch), source, checkout, target_args)
        destination = directory / built.name
        if not destination.is_file() or _digest(destination) != _digest(built):
            for stale in directory.glob("marmot_appliance-*.whl"):
                stale.unlink()
            shutil.copy2(built, destination)
            changed = True
    downloaded = False
    stamp = directory / RESOLVED_STAMP
    resolved_key = _resolution_key(directory, target_args, extra)
    # The same wheels resolved for the same targets before: skip pip's dry run (seconds).
    known_good = stamp.is_file() and stamp.read_text() == resolved_key
    complete = known_good or dependencies_complete(directory, destination, target_args)
    if extra and complete and not known_good:
        result = _pip(["install", "--dry-run", "--ignore-installed", "--no-index", "--find-links",
                       str(directory), *target_args, *extra], timeout_s=300)
        complete = result.returncode == 0
    if not complete:
        # The one step that needs a package index: fetch the dependency wheels once.
        result = _pip(["download", "--only-binary=:all:", "-d", str(directory), *target_args, str(destination), *extra])
        if result.returncode != 0:
            raise DeployError(
                "could not download the dependency wheels (no package index reachable?):\n"
                + (result.stderr or result.stdout)[-2000:]
            )
        downloaded = changed = True
    stamp.write_text(_resolution_key(directory, target_args, extra))
    changed = write_manifest(directory) or changed
    changed = write_archive(directory) or changed
    return WheelhouseResult(directory=directory, project_wheel=destination.name, changed=changed,
                            downloaded=downloaded, origin=origin)
