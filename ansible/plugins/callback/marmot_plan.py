"""Callback plugin: record what a (check-mode) run changed, per host and task, as JSON.

`marmot-appliance plan/apply` enable it with ANSIBLE_CALLBACKS_ENABLED=marmot_plan and
MARMOT_PLAN_FILE=<path>; the file is written when the playbook ends. Diffs of tasks marked
no_log are never recorded (they would carry secrets).
"""

from __future__ import annotations

DOCUMENTATION = r"""
    name: marmot_plan
    type: notification
    short_description: Records changed tasks and their diffs as JSON for marmot-appliance plan
    description:
        - Writes {"hosts" {host [{task, role, status, diff}]}, "stats" {...}} to the file named by
          the MARMOT_PLAN_FILE environment variable when the playbook ends.
    requirements:
        - enabled in ANSIBLE_CALLBACKS_ENABLED
"""

import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "marmot_plan"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.hosts = {}
        self.failures = []

    def _record(self, result, status):
        task = result._task
        host = result._host.get_name()
        entry = {
            "task": task.name or task.get_name(),  # without the "role : " prefix
            "role": task._role.get_name() if task._role else None,
            "status": status,
            "diff": [],
        }
        if not task.no_log:
            diffs = result._result.get("diff") or []
            for diff in diffs if isinstance(diffs, list) else [diffs]:
                if isinstance(diff, dict) and ("before" in diff or "after" in diff):
                    entry["diff"].append(
                        {
                            "path": diff.get("after_header") or diff.get("before_header") or "",
                            "before": diff.get("before", "") if isinstance(diff.get("before", ""), str) else json.dumps(diff.get("before")),
                            "after": diff.get("after", "") if isinstance(diff.get("after", ""), str) else json.dumps(diff.get("after")),
                        }
                    )
        if status in ("failed", "unreachable"):
            message = result._result.get("msg") or result._result.get("stderr") or ""
            self.failures.append({"host": host, "task": entry["task"], "msg": str(message)[:2000],
                                  "unreachable": status == "unreachable"})
        self.hosts.setdefault(host, []).append(entry)

    def v2_runner_on_ok(self, result):
        if result._result.get("changed", False):
            self._record(result, "changed")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        if not ignore_errors:
            self._record(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        path = os.environ.get("MARMOT_PLAN_FILE")
        if not path:
            return
        summary = {host: stats.summarize(host) for host in sorted(stats.processed)}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"hosts": self.hosts, "failures": self.failures, "stats": summary}, handle, indent=2)
