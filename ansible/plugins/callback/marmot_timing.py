"""Callback plugin: where a playbook run's time goes, task by task (like profile_tasks).

ansible-core ships no profile_tasks (it is in the ansible.posix collection, which the
appliance does not install). Enable this one with ANSIBLE_CALLBACKS_ENABLED=marmot_timing: at
the end of the run it prints the wall time and the slowest tasks (time from a task's start to
the next task's start, all hosts together), docs/performance.md.
"""

from __future__ import annotations

DOCUMENTATION = r"""
    name: marmot_timing
    type: aggregate
    short_description: Prints the run's wall time and its slowest tasks
    description:
        - At the end of the playbook, prints the total wall time and the slowest tasks
          (MARMOT_TIMING_TOP of them, 15 by default).
    requirements:
        - enabled in ANSIBLE_CALLBACKS_ENABLED
"""

import os
import time

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "marmot_timing"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.started = time.monotonic()
        self.current = None  # (label, start)
        self.spent: dict[str, float] = {}

    def _close_current(self):
        if self.current is not None:
            label, start = self.current
            self.spent[label] = self.spent.get(label, 0.0) + time.monotonic() - start
            self.current = None

    def _start(self, label):
        self._close_current()
        self.current = (label, time.monotonic())

    def v2_playbook_on_play_start(self, play):
        self._start(f"(play start) {play.get_name()}")

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._start(task.get_name())

    def v2_playbook_on_handler_task_start(self, task):
        self._start(f"(handler) {task.get_name()}")

    def v2_playbook_on_stats(self, stats):
        self._close_current()
        total = time.monotonic() - self.started
        top = int(os.environ.get("MARMOT_TIMING_TOP", "15"))
        self._display.display(f"\nmarmot_timing: wall time {total:.1f} s in {len(self.spent)} tasks; slowest:")
        for label, seconds in sorted(self.spent.items(), key=lambda item: -item[1])[:top]:
            self._display.display(f"  {seconds:7.2f} s  {label}")
