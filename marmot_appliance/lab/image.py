"""The lab's Debian 12 root filesystem: built once with debootstrap, cached, shared read-only.

Every lab host boots an overlay of this image, so the ~45 s debootstrap runs once per cache.
The cache key covers everything that shapes the image; change IMAGE_PACKAGES or `_customize`
and bump IMAGE_REVISION, and a new image is built beside the old one.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
from pathlib import Path

from marmot_appliance.lab.mirror import debian_mirror
from marmot_appliance.lab.shell import LabError, run

SUITE = "bookworm"
IMAGE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",  # the role creates a virtualenv; ensurepip's bundled wheels work offline
    "iproute2",
    "openssh-server",
    "sudo",  # Vagrant boxes reach root through sudo; the lab hosts do the same
)
IMAGE_REVISION = 2
VAGRANT_USER = "vagrant"  # same login as a Vagrant box, so one spec serves both
DEBOOTSTRAP_TIMEOUT_S = 900.0


def image_key() -> str:
    material = f"{SUITE}|{','.join(IMAGE_PACKAGES)}|{IMAGE_REVISION}"
    return f"debian-{SUITE}-{hashlib.sha256(material.encode()).hexdigest()[:12]}"


def _customize(rootfs: Path) -> None:
    """Make the image boot quietly as an ssh-reachable host; per-host identity comes later."""
    # Host keys are generated per lab host; an image-wide key would make every host the same.
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (rootfs / "etc/machine-id").write_text("")  # systemd fills in a fresh id per host
    sshd_dropin = rootfs / "etc/ssh/sshd_config.d/lab.conf"
    sshd_dropin.write_text(
        "# marmot-appliance lab: key-only root login from the controller namespace\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
    )
    # A `vagrant` user with passwordless sudo, like every Vagrant base box.
    run(["chroot", str(rootfs), "useradd", "--create-home", "--shell", "/bin/bash", VAGRANT_USER])
    sudoers = rootfs / "etc/sudoers.d" / VAGRANT_USER
    sudoers.write_text(f"{VAGRANT_USER} ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    # Units that only make sense on real hardware or with a real console.
    wants = rootfs / "etc/systemd/system"
    for unit in ("getty@tty1.service", "systemd-networkd-wait-online.service"):
        link = wants / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def ensure_image(image_cache: Path, progress=print) -> Path:
    """Path to the cached root filesystem, building it first when missing."""
    key = image_key()
    image_dir = image_cache / key
    rootfs = image_dir / "rootfs"
    image_cache.mkdir(parents=True, exist_ok=True)
    with open(image_cache / f"{key}.lock", "w") as lock:
        # Two lab builds at once must not both run debootstrap into the same place.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (image_dir / "complete").is_file():
            return rootfs
        if shutil.which("debootstrap") is None:
            raise LabError("debootstrap is not installed (apt-get install debootstrap)")
        building = image_cache / f"{key}.building"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        mirror = debian_mirror()
        progress(f"building lab image {key} with debootstrap from {mirror} (once, about a minute)")
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(IMAGE_PACKAGES)}",
                SUITE,
                str(building / "rootfs"),
                mirror,
            ],
            timeout_s=DEBOOTSTRAP_TIMEOUT_S,
        )
        _customize(building / "rootfs")
        (building / "complete").write_text(f"{key}\n{mirror}\n")
        shutil.rmtree(image_dir, ignore_errors=True)
        building.rename(image_dir)
        return rootfs
