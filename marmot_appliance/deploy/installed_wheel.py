"""A wheel of the installed marmot-appliance, rebuilt from its own files (no build tools, no index).

A plain `pip install .` leaves no source tree behind, but the installed package is the code the
controller itself runs; its `RECORD` lists every file the original wheel put in site-packages.
Zipping those files again (with a fresh RECORD, fixed timestamps and sorted entries) gives a
wheel that installs the same code on the hosts, byte-identical for unchanged files.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import marmot_appliance
from marmot_appliance.deploy.errors import DeployError

DIST_NAME = "marmot_appliance"
# Written by the installer, not part of a wheel (RECORD is regenerated).
INSTALLER_FILES = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def installed_dist_info() -> Path | None:
    """The dist-info beside the imported package (not whatever else sys.path holds)."""
    site = Path(marmot_appliance.__file__).resolve().parents[1]
    candidates = sorted(site.glob(f"{DIST_NAME}-*.dist-info"))
    return candidates[-1] if candidates else None


def is_editable(dist_info: Path) -> bool:
    direct_url = dist_info / "direct_url.json"
    if not direct_url.is_file():
        return False
    try:
        return bool(json.loads(direct_url.read_text()).get("dir_info", {}).get("editable"))
    except json.JSONDecodeError:
        return False


def _record_paths(dist_info: Path) -> list[str]:
    with open(dist_info / "RECORD", newline="") as handle:
        paths = [row[0] for row in csv.reader(handle) if row]
    kept = []
    for path in paths:
        parts = Path(path).parts
        if path.startswith("..") or Path(path).is_absolute():
            continue  # console scripts: pip regenerates them from entry_points.txt
        if "__pycache__" in parts or path.endswith(".pyc"):
            continue  # compiled by the installer, not shipped
        if parts[0] == dist_info.name and parts[-1] in INSTALLER_FILES:
            continue
        kept.append(path)
    return sorted(kept)


def _wheel_tag(dist_info: Path) -> str:
    for line in (dist_info / "WHEEL").read_text().splitlines():
        if line.startswith("Tag:"):
            return line.split(":", 1)[1].strip()
    return "py3-none-any"


def _record_digest(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_installed_wheel(into: Path) -> Path:
    """Write the installed package as a wheel into `into`; returns its path."""
    dist_info = installed_dist_info()
    if dist_info is None or not (dist_info / "RECORD").is_file():
        raise DeployError("the installed marmot-appliance has no RECORD to rebuild its wheel from")
    if is_editable(dist_info):
        raise DeployError("the installed marmot-appliance is editable: build from its source tree instead")
    site = dist_info.parent
    version = dist_info.name[len(DIST_NAME) + 1:-len(".dist-info")]
    wheel_path = into / f"{DIST_NAME}-{version}-{_wheel_tag(dist_info)}.whl"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for relative in _record_paths(dist_info):
            source = site / relative
            if not source.is_file():
                raise DeployError(f"the installed package lacks {source} (reinstall marmot-appliance)")
            data = source.read_bytes()
            info = zipfile.ZipInfo(relative, date_time=ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
            writer.writerow([relative, _record_digest(data), len(data)])
        record_name = f"{dist_info.name}/RECORD"
        writer.writerow([record_name, "", ""])
        info = zipfile.ZipInfo(record_name, date_time=ZIP_EPOCH)
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, record.getvalue())
    into.mkdir(parents=True, exist_ok=True)
    wheel_path.write_bytes(buffer.getvalue())
    return wheel_path
