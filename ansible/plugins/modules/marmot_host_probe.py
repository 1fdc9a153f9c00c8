#!/usr/bin/python
"""Ansible module: one read-only look at what a role's idempotent tasks would check (issue 13).

A no-op `site.yml` paid one module run per system group, user, directory and systemd unit, and
two per unchanged file (copy's remote checksum, then its file step), each only to find the host
already as wanted. The roles run this module once per host instead and skip those tasks for
what it reports as matching. It reports a match only where the real module would change nothing
(ansible.builtin.group/user/file/copy/template/systemd_service, as the roles call them); anything
it cannot verify (a lookup fails, SELinux is enabled, a symlink, a file whose content differs, a
unit in any state but loaded, enabled, active and not awaiting a daemon-reload) is left out, so
the real task runs.
"""

from __future__ import annotations

DOCUMENTATION = r"""
module: marmot_host_probe
short_description: Report which paths are missing and which groups, users, directories and units already match
description:
  - Read-only (check mode changes nothing either). Each list in the result holds the names of the
    requested items that already are exactly as requested.
options:
  paths:
    description: Paths whose absence is reported (C(missing)).
    type: list
    elements: path
    default: []
  groups:
    description: Group names; reported (C(groups)) when the group exists (ansible.builtin.group without gid).
    type: list
    elements: str
    default: []
  users:
    description: >-
      Users as ansible.builtin.user creates them, each {name, group, home, shell}; reported
      (C(users)) when the user exists with that primary group, home and shell.
    type: list
    elements: dict
    default: []
  directories:
    description: >-
      Directories as ansible.builtin.file state=directory sets them, each {path, owner, group, mode}
      (path may be a list of paths that share owner, group and mode); each path is reported
      (C(directories)) when it is a directory (not a symlink) with that owner, group and mode.
    type: list
    elements: dict
    default: []
  files:
    description: >-
      Files as ansible.builtin.copy/template leave them, each {path, owner, group, mode, checksum}
      (checksum = SHA-1 of the content, as those compute it); reported (C(files)) when the path is
      a regular file (not a symlink) with that content, owner, group and mode, where copy would
      transfer nothing and its file step would change nothing. The checksums are kept out of the
      logged invocation (the content may hold secrets).
    type: list
    elements: dict
    default: []
    suboptions:
      path: {type: path, required: true, description: The file.}
      owner: {type: str, required: true, description: Its owner (name or uid).}
      group: {type: str, required: true, description: Its group (name or gid).}
      mode: {type: str, required: true, description: Its mode in octal.}
      checksum: {type: str, required: true, no_log: true, description: SHA-1 of the wanted content.}
  units:
    description: >-
      systemd units; reported (C(units)) when loaded, enabled, active and not awaiting a
      daemon-reload (ansible.builtin.systemd_service enabled=true state=started would change nothing).
    type: list
    elements: str
    default: []
"""

import grp
import hashlib
import os
import pwd
import stat
import subprocess

from ansible.module_utils.basic import AnsibleModule


def _uid(owner):
    """The uid ansible.builtin.file gives `owner` (a number or a user name)."""
    try:
        return int(owner)
    except ValueError:
        return pwd.getpwnam(owner).pw_uid


def _gid(group):
    """The gid ansible.builtin.file gives `group` (a number or a group name)."""
    try:
        return int(group)
    except ValueError:
        return grp.getgrnam(group).gr_gid


def _group_exists(name):
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _user_matches(user):
    try:
        entry = pwd.getpwnam(user["name"])
        return (entry.pw_gid == grp.getgrnam(user["group"]).gr_gid
                and entry.pw_dir == user["home"] and entry.pw_shell == user["shell"])
    except (KeyError, TypeError):
        return False


def _directory_paths(directory):
    paths = directory.get("path")
    return [paths] if isinstance(paths, str) else list(paths or [])


def _directory_matches(path, directory):
    try:
        status = os.lstat(path)
        return (stat.S_ISDIR(status.st_mode)
                and status.st_uid == _uid(str(directory["owner"]))
                and status.st_gid == _gid(str(directory["group"]))
                and stat.S_IMODE(status.st_mode) == int(str(directory["mode"]), 8))
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _file_matches(wanted):
    try:
        status = os.lstat(wanted["path"])
        if not (stat.S_ISREG(status.st_mode)
                and status.st_uid == _uid(str(wanted["owner"]))
                and status.st_gid == _gid(str(wanted["group"]))
                and stat.S_IMODE(status.st_mode) == int(str(wanted["mode"]), 8)):
            return False
        digest = hashlib.sha1()  # noqa: S324 (copy's own checksum, not a security measure)
        with open(wanted["path"], "rb") as handle:
            for block in iter(lambda: handle.read(1 << 16), b""):
                digest.update(block)
        return digest.hexdigest() == str(wanted["checksum"])
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _unit_running(systemctl, unit):
    if not systemctl:
        return False
    try:
        shown = subprocess.run(
            [systemctl, "show", "--property=LoadState,UnitFileState,ActiveState,NeedDaemonReload", "--", unit],
            capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    if shown.returncode != 0:
        return False
    properties = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    return properties == {"LoadState": "loaded", "UnitFileState": "enabled", "ActiveState": "active",
                          "NeedDaemonReload": "no"}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            paths=dict(type="list", elements="path", default=[]),
            groups=dict(type="list", elements="str", default=[]),
            users=dict(type="list", elements="dict", default=[]),
            directories=dict(type="list", elements="dict", default=[]),
            files=dict(type="list", elements="dict", default=[], options=dict(
                path=dict(type="path", required=True),
                owner=dict(type="str", required=True),
                group=dict(type="str", required=True),
                mode=dict(type="str", required=True),
                checksum=dict(type="str", required=True, no_log=True),
            )),
            units=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    params = module.params
    # ansible.builtin.file (also copy's file step) compares SELinux contexts where SELinux is
    # enabled: not checked here, so no directory or file is reported as matching on such a host.
    selinux = os.path.exists("/sys/fs/selinux/enforce")
    systemctl = module.get_bin_path("systemctl") if params["units"] else None
    module.exit_json(
        changed=False,
        # Like the `[ -e PATH ]` it replaces: a dangling symlink counts as missing.
        missing=[path for path in params["paths"] if not os.path.exists(path)],
        groups=[name for name in params["groups"] if _group_exists(name)],
        users=[user["name"] for user in params["users"] if _user_matches(user)],
        directories=[] if selinux else [path for d in params["directories"] for path in _directory_paths(d)
                                        if _directory_matches(path, d)],
        files=[] if selinux else [f["path"] for f in params["files"] if _file_matches(f)],
        units=[unit for unit in params["units"] if _unit_running(systemctl, unit)],
    )


if __name__ == "__main__":
    main()
